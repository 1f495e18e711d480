"""Hostile chat, preference and prompt data, and domain names the data lacks: one line at ``effitrain check`` (which
reads chat files through, as it reads ``dataset=local``), the same line from the builder a launch runs, and nothing
written.  Rows that are dropped (conversations whose answers fall past ``dataset.seq_len``) are counted on the
console.  The style is tests/test_reliability_inputs.py's: ``effitrain check`` in this process, ``snapshot`` to show
that nothing changed, subprocesses only where the exit status or a launch is the point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import effitrain_cli
from effitrain.registry import ConfigError
from test_reliability_inputs import assert_one_line_error, jsonl, private_cache, run_check, snapshot  # noqa: F401


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def chats(n: int, **extra) -> list[dict]:
    return [{"messages": conversation(f"what is {i} + 1?", str(i + 1)), **extra} for i in range(n)]


def pairs(n: int) -> list[dict]:
    return [{"chosen": conversation(f"what is {i} + 1?", str(i + 1)),
             "rejected": conversation(f"what is {i} + 1?", str(i + 2))} for i in range(n)]


# ------------------------------------------------------------------------------------------------ chat files
def _chat_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (overrides after dataset=chat_local objective=sft, fragments the one error line must contain)."""
    d = tmp / "chat"
    d.mkdir()
    good = chats(40)
    (d / "latin1.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good[:3])
                                     + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    jsonl(d / "number_line.jsonl", good[:3] + ["42"])
    jsonl(d / "list_line.jsonl", good[:3] + ['[{"role": "user", "content": "hi"}]'])
    jsonl(d / "malformed.jsonl", good[:2] + ['{"messages": [oops'])
    jsonl(d / "no_messages.jsonl", good[:2] + [{"conversation": conversation("q", "a")}])
    jsonl(d / "some_without_domain.jsonl", chats(20, src="math") + chats(1))
    jsonl(d / "no_domain_field.jsonl", good)
    jsonl(d / "empty_answer.jsonl", good[:5] + [{"messages": conversation("q", "  ")}] + good[5:]
          + [{"messages": conversation("r", "")}])
    jsonl(d / "same_pair.jsonl", pairs(20) + [{"chosen": conversation("q", "a"), "rejected": conversation("q", "a")}])
    jsonl(d / "no_references.jsonl", [{"messages": conversation(f"q{i}", "")} for i in range(20)])
    jsonl(d / "some_without_reference.jsonl", chats(20) + [{"messages": conversation("q", "")}])
    jsonl(d / "few.jsonl", chats(3))
    (d / "empty.jsonl").write_bytes(b"")
    sft = ["objective=sft"]
    dpo = ["objective=dpo", "dataset.format=preference"]
    grpo = ["objective=grpo", "dataset.format=prompts"]
    return {
        "non_utf8": ([*sft, f"dataset.path={d}/latin1.jsonl"], ["latin1.jsonl' line 4", "not UTF-8", "0xe9"]),
        "line_is_a_number": ([*sft, f"dataset.path={d}/number_line.jsonl"],
                             ["number_line.jsonl' line 4", "is a JSON number, not an object"]),
        "line_is_a_list": ([*sft, f"dataset.path={d}/list_line.jsonl"],
                           ["list_line.jsonl' line 4", "is a JSON list, not an object"]),
        "malformed_json": ([*sft, f"dataset.path={d}/malformed.jsonl"], ["malformed.jsonl' line 3", "not valid JSON"]),
        "no_messages_field": ([*sft, f"dataset.path={d}/no_messages.jsonl"],
                              ["line 3", "no 'messages'", "fields: conversation", "dataset.messages_field"]),
        "rows_without_domain": ([*sft, f"dataset.path={d}/some_without_domain.jsonl", "dataset.domain_field=src",
                                 "dataset.eval_examples_per_domain=2"],
                                ["dataset.domain_field", "1 of 21 rows have no 'src'", "line 21"]),
        "domain_field_absent": ([*sft, f"dataset.path={d}/no_domain_field.jsonl", "dataset.domain_field=src"],
                                ["dataset.domain_field", "field 'src' not found", "fields: messages"]),
        "missing_file": ([*sft, f"dataset.path={d}/nothere.jsonl"], ["dataset.path", "does not exist"]),
        "empty_file": ([*sft, f"dataset.path={d}/empty.jsonl"], ["dataset.path", "is empty"]),
        "empty_assistant_message": ([*sft, f"dataset.path={d}/empty_answer.jsonl"],
                                    ["2 of 42 conversations have an empty assistant message",
                                     "empty_answer.jsonl' line 6, messages[1]"]),
        "identical_preference_pair": ([*dpo, f"dataset.path={d}/same_pair.jsonl", "dataset.eval_examples_per_domain=2"],
                                      ["1 of 21 preference pairs have the same chosen and rejected",
                                       "same_pair.jsonl' line 21"]),
        "all_references_empty": ([*grpo, f"dataset.path={d}/no_references.jsonl",
                                  "dataset.eval_examples_per_domain=2"],
                                 ["all prompts have an empty reference answer", "exact_answer",
                                  "rewards that need none"]),
        "a_reference_empty": ([*grpo, f"dataset.path={d}/some_without_reference.jsonl",
                               "dataset.eval_examples_per_domain=2"],
                              ["1 of 21 prompts have an empty reference answer", "line 21"]),
        "too_few_for_holdout": ([*sft, f"dataset.path={d}/few.jsonl", "dataset.eval_examples_per_domain=8"],
                                ["dataset.eval_examples_per_domain", "only 3 conversations", "below 3"]),
        "missing_eval_file": ([*sft, f"dataset.path={d}/few.jsonl", f"dataset.eval_path={d}/gone.jsonl"],
                              ["dataset.eval_path", "does not exist"]),
    }


CHAT_CASES = ["non_utf8", "line_is_a_number", "line_is_a_list", "malformed_json", "no_messages_field",
              "rows_without_domain", "domain_field_absent", "missing_file", "empty_file", "empty_assistant_message",
              "identical_preference_pair", "all_references_empty", "a_reference_empty", "too_few_for_holdout",
              "missing_eval_file"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badchat")
    return tmp, _chat_cases(tmp)


@pytest.mark.parametrize("case", CHAT_CASES)
def test_bad_chat_data_is_one_line_at_check(case, chat_dir, capsys, private_cache):
    tmp, cases = chat_dir
    overrides, expected = cases[case]
    before = snapshot(tmp, private_cache)
    code, out, err = run_check(["dataset=chat_local", *overrides], capsys)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(tmp, private_cache) == before


def test_chat_case_list_is_complete(chat_dir):
    assert sorted(chat_dir[1]) == sorted(CHAT_CASES)


@pytest.mark.parametrize("case", ["non_utf8", "line_is_a_number", "line_is_a_list", "rows_without_domain",
                                  "empty_assistant_message", "identical_preference_pair"])
def test_the_builder_a_launch_runs_refuses_chat_data_with_the_same_line(case, chat_dir):
    """Before, these were a UnicodeDecodeError, a TypeError and a KeyError from deep inside the builder, and the
    empty answers and identical pairs were trained on."""
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.data.chat_sources import build_chat_local

    _, cases = chat_dir
    overrides, expected = cases[case]
    params = validate(compose_config(["dataset=chat_local", *overrides]).cfg).block("dataset").params
    with pytest.raises(ConfigError) as refused:
        build_chat_local(params)
    for text in expected:
        assert text in str(refused.value)


def test_good_chat_data_passes_check(tmp_path, capsys):
    jsonl(tmp_path / "chat.jsonl", chats(40, src="math"))
    jsonl(tmp_path / "pairs.jsonl", pairs(40))
    jsonl(tmp_path / "prompts.jsonl", [{"messages": conversation(f"q{i}", "")} for i in range(40)])
    for overrides in (["objective=sft", f"dataset.path={tmp_path}/chat.jsonl", "dataset.domain_field=src"],
                      ["objective=dpo", "dataset.format=preference", f"dataset.path={tmp_path}/pairs.jsonl"],
                      # no reward reads the references: prompts without answers are fine
                      ["objective=grpo", "dataset.format=prompts", f"dataset.path={tmp_path}/prompts.jsonl",
                       "objective.rewards=[{name: length}]"]):
        code, out, err = run_check(["dataset=chat_local", "dataset.eval_examples_per_domain=4", *overrides], capsys)
        assert code == 0 and out.startswith("ok:"), err


def test_a_launch_refuses_a_bad_chat_file_before_hydra_or_deepspeed(chat_dir, tmp_path):
    """The pre-flight of a real launch reads a small chat file through: exit 2, one line, no run directory."""
    _, cases = chat_dir
    overrides, expected = cases["line_is_a_number"]
    run_dir = tmp_path / "run"
    result = effitrain_cli("dataset=chat_local", *overrides, f"run_dir={run_dir}", timeout=120)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, *expected)
    assert not run_dir.exists()
    assert "deepspeed" not in (result.stdout + result.stderr).lower()


def test_a_sweep_refuses_a_member_with_a_missing_chat_file_before_any_member_trains(chat_dir, tmp_path):
    tmp, _ = chat_dir
    good = tmp / "chat" / "few.jsonl"
    root = tmp_path / "sweep"
    result = effitrain_cli("-m", "dataset=chat_local", "objective=sft", "dataset.eval_examples_per_domain=1",
                           f"dataset.path={good},{tmp}/chat/gone.jsonl", f"run_dir={root}", timeout=120)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, "gone.jsonl", "does not exist")
    assert not root.exists()


def test_a_later_stages_chat_file_is_checked_before_the_first_stage(chat_dir, capsys):
    """Recipe dpo trains SFT, then DPO on pairs: a missing or bad pairs file was found only after SFT trained."""
    tmp, _ = chat_dir
    for path, expected in ((f"{tmp}/chat/gone.jsonl", "does not exist"),
                           (f"{tmp}/chat/same_pair.jsonl", "have the same chosen and rejected")):
        code, out, err = run_check(["+recipe=dpo", "~methods.answer_accuracy", "+stages.1.dataset.name=chat_local",
                                    f"+stages.1.dataset.path={path}", "+stages.1.dataset.eval_examples_per_domain=2"],
                                   capsys)
        assert_one_line_error(code, out, err, "stages.dpo: dataset.path", expected)


# ------------------------------------------------------------------------------------------------ dropped rows
def _splits(tmp_path: Path, fmt: str, objective: str, rows: list[dict], seq_len: int = 64):
    """A function that builds the rows of ``rows`` (training) as a launch does; four short held-out questions."""
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.data.chat_sources import build_chat_local, build_chat_splits

    path = jsonl(tmp_path / f"{fmt}.jsonl", rows)
    held_out = jsonl(tmp_path / "eval.jsonl", chats(4))
    spec = validate(compose_config(["dataset=chat_local", f"dataset.path={path}", f"dataset.eval_path={held_out}",
                                    f"dataset.format={fmt}", f"objective={objective}", f"dataset.seq_len={seq_len}",
                                    "model.vocab_size=300"]).cfg)
    raw = build_chat_local(spec.block("dataset").params)
    return lambda: build_chat_splits(spec.block("dataset").params, spec.block("model").params, raw,
                                     cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("fmt, objective, what", [("chat", "sft", "training conversations"),
                                                  ("prompts", "grpo", "prompts")])
def test_conversations_cut_away_by_seq_len_are_counted_on_the_console(tmp_path, capsys, fmt, objective, what):
    """Every fourth question is longer than seq_len, so its answer falls past the cut: before, those conversations
    were dropped without a word.  The count is printed again when the rows come from the cache."""
    rows = [{"messages": conversation("word " * (200 if i % 4 == 0 else 3), str(i))} for i in range(100)]
    build = _splits(tmp_path, fmt, objective, rows)
    for _ in range(2):
        capsys.readouterr()
        _, train, _ = build()
        out = capsys.readouterr().out
        assert f"dataset: 25 of 100 {what} keep no answer token within dataset.seq_len=64" in out
        assert len(train) > 0


def test_no_conversation_left_after_the_cut_is_refused(tmp_path):
    rows = [{"messages": conversation("word " * 200, str(i))} for i in range(12)]
    with pytest.raises(ConfigError, match="none of the 12 conversations keeps an assistant token within 64 tokens"):
        _splits(tmp_path, "chat", "sft", rows)()


# ------------------------------------------------------------------------------------------------ objectives
def test_grpo_with_every_reward_weight_zero_is_refused(capsys):
    base = ["dataset=chat_demo", "dataset.format=prompts", "objective=grpo"]
    code, out, err = run_check([*base, "objective.rewards=[{name: exact_answer, weight: 0}, {name: length, "
                                       "weight: 0}]"], capsys)
    assert_one_line_error(code, out, err, "objective.rewards", "every reward has weight 0")
    # one reward of weight 0 beside a weighted one is a monitor (computed and logged): accepted
    code, out, err = run_check([*base, "objective.rewards=[{name: exact_answer}, {name: length, weight: 0}]"], capsys)
    assert code == 0, err


def _save_llama(folder: Path, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=256)).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")  # the check looks for tokenizer files, it does not load them
    return folder


def test_a_reference_model_with_another_vocabulary_is_refused(tmp_path, capsys):
    policy, reference = _save_llama(tmp_path / "policy", 320), _save_llama(tmp_path / "reference", 300)
    code, out, err = run_check(["dataset=chat_demo", "dataset.format=preference", "objective=dpo",
                                "model=pretrained", f"model.path={policy}", "dataset.seq_len=64",
                                f"objective.reference={reference}"], capsys)
    assert_one_line_error(code, out, err, "objective.reference", "vocabulary of 300 tokens", "the policy", "320")
    # at launch, against the policy as built (a model built from config has its tokenizer's size)
    import torch

    from effitrain.objectives.preference import build_dpo
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY
    from transformers import LlamaConfig, LlamaForCausalLM

    load_builtin_blocks()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    params = REGISTRY.parse("objective", {"name": "dpo", "reference": str(reference)}).params
    with pytest.raises(ConfigError, match="objective.reference: the model at .* vocabulary of 300 tokens, the "
                                          "policy 512"):
        build_dpo(params, model=model, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ domains
@pytest.fixture(scope="module")
def domain_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("domains")
    jsonl(tmp / "text.jsonl", [{"text": f"document {i} about things " * 4, "src": "a" if i % 2 else "b"}
                               for i in range(200)])
    jsonl(tmp / "chat.jsonl", chats(30, src="a") + chats(30, src="b"))
    return tmp


@pytest.mark.parametrize("overrides, expected", [
    (["+recipe=domain_upsampling"], ["timeline.mixture.points[0].value.prose", "domain 'prose' is not in the "
                                                                                 "training data", "domains: a, b"]),
    (["curriculum=skill_it", "+curriculum.prior={a: 2, c: 1}"], ["curriculum.prior", "domain 'c'"]),
    (["+recipe=difficulty_curriculum", "curriculum.scorer=null", "curriculum.domain_order=[b, x]"],
     ["curriculum.domain_order", "domain 'x'"]),
    (["+recipe=regmix"], ["stages.proxies: sweep.target", "domain 'prose' is not in the training data"]),
])
def test_domains_the_local_data_lacks_are_refused_at_check(domain_data, overrides, expected, capsys):
    """Before, `check` said ok and the mixture sampler (or the sweep, after its stage began) refused at launch."""
    code, out, err = run_check(["dataset=local", f"dataset.path={domain_data}/text.jsonl", "dataset.domain_field=src",
                                "dataset.eval_examples_per_domain=4", *overrides], capsys)
    assert_one_line_error(code, out, err, *expected)


def test_domains_of_the_data_are_accepted_and_chat_domains_are_checked_too(domain_data, capsys):
    mixture = "+timeline.mixture={unit: step, points: [{at: 0, value: {a: 0.3, b: 0.7}}]}"
    code, out, err = run_check(["dataset=local", f"dataset.path={domain_data}/text.jsonl", "dataset.domain_field=src",
                                "dataset.eval_examples_per_domain=4", "curriculum=mixture", mixture], capsys)
    assert code == 0, err
    # regmix's declared mixture is a stand-in (its sweep sets every member's and the main stage's): not checked
    code, out, err = run_check(["dataset=local", f"dataset.path={domain_data}/text.jsonl", "dataset.domain_field=src",
                                "dataset.eval_examples_per_domain=4", "+recipe=regmix", "stages.0.sweep.target=a"],
                               capsys)
    assert code == 0, err
    code, out, err = run_check(["dataset=chat_local", f"dataset.path={domain_data}/chat.jsonl", "objective=sft",
                                "dataset.domain_field=src", "dataset.eval_examples_per_domain=4", "curriculum=mixture",
                                mixture.replace("a: 0.3", "c: 0.3")], capsys)
    assert_one_line_error(code, out, err, "value.c", "domain 'c' is not in the training data", "domains: a, b")


# ------------------------------------------------------------------------------------------------ SFT on your data
def test_the_documented_sft_command_on_your_data_says_what_to_add_and_then_works(domain_data, capsys):
    command = ["+recipe=sft", "dataset=chat_local", f"dataset.path={domain_data}/chat.jsonl",
               "dataset.eval_examples_per_domain=4"]
    code, out, err = run_check(command, capsys)
    assert_one_line_error(code, out, err, "answer_accuracy", "'~methods.answer_accuracy'")
    code, out, err = run_check([*command, "~methods.answer_accuracy"], capsys)
    assert code == 0 and "methods [none]" in out, err
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    assert "~methods.answer_accuracy" in guide
