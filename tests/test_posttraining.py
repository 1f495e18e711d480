"""Post-training data and objectives (issue #14, first slice).

What holds: a conversation's labels are its ids on exactly the assistant tokens (content and closing EOS) and -100
everywhere else; packed conversations do not attend to each other (a conversation's logits are the same packed and
alone); the built-in arithmetic set is checkable and its eval questions never occur in train; ``sft`` is the mean
next-token loss over the assistant tokens; ``dpo``/``simpo`` equal their closed forms on a hand-built pair (and
TRL's DPO loss when trl is installed).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from effitrain.data import arithmetic_chat, chat
from effitrain.objectives.common import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the arithmetic conversations rendered with the default template (no template
    of its own, like effitrain's BPE)."""
    import datasets

    from effitrain.data.tokenizer import train_bpe

    train, _ = arithmetic_chat.splits(300, 0)
    texts = [f"<|user|>\n{e['question']}\n<|assistant|>\n{e['answer']}" for e in train]
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 300, folder)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert tok.chat_template is None
    return tok


def tiny_llama(vocab: int, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"},
         {"role": "assistant", "content": "8"}]


def test_default_template_is_tulu3(tokenizer):
    text = tokenizer.apply_chat_template(CONVO, chat_template=chat.chat_template(tokenizer), tokenize=False)
    assert text == ("<|system|>\nBe brief.\n<|user|>\nWhat is 2+3?\n<|assistant|>\n5<|endoftext|>\n"
                    "<|user|>\nAnd 4+4?\n<|assistant|>\n8<|endoftext|>")


def test_labels_are_exactly_the_assistant_tokens(tokenizer):
    ids, labels = chat.encode_conversation(tokenizer, CONVO)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    # each assistant message's own text: its content and the EOS that closes it; the newline after an inner turn's
    # EOS is rendered only once the next message exists, so it belongs to the untrained prompt of that turn
    assert tokenizer.decode(trained) == "5<|endoftext|>8<|endoftext|>"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # the whole rendering, nothing more and nothing less
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        CONVO, chat_template=chat.DEFAULT_CHAT_TEMPLATE, tokenize=False)
    # the prompt given at generation is the untrained prefix of the training ids
    prompt = chat.prompt_ids(tokenizer, CONVO[:2])
    assert prompt == ids[:len(prompt)] and tokenizer.decode(prompt).endswith("<|assistant|>\n")
    assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] == ids[len(prompt)]


def test_packing_places_whole_conversations_and_restarts_positions(tokenizer):
    encoded = [chat.encode_conversation(tokenizer, e["messages"]) for e in arithmetic_chat.splits(6, 0)[0]]
    lengths = [len(ids) for ids, _ in encoded]
    seq_len = max(lengths) * 2 + 1
    packed = chat.pack_conversations(encoded, seq_len, tokenizer.pad_token_id)
    rows = packed.rows
    assert rows.shape[1:] == (3, seq_len) and packed.truncated == 0
    # every conversation appears whole, in order, positions 0..n-1
    flat = [(r, start) for r in range(len(rows)) for start in range(seq_len) if rows[r, 2, start] == 0]
    found = []
    for r, start in flat:
        end = start + 1
        while end < seq_len and rows[r, 2, end] == rows[r, 2, end - 1] + 1:
            end += 1
        found.append((rows[r, 0, start:end].tolist(), rows[r, 1, start:end].tolist()))
    assert [f for f in found if any(label != IGNORE_INDEX for label in f[1])] == [(i, l) for i, l in encoded]
    assert (rows[:, 1][rows[:, 0] == tokenizer.pad_token_id] == IGNORE_INDEX).all()


def test_packed_conversations_do_not_attend_across_boundaries(tokenizer):
    model = tiny_llama(len(tokenizer))
    convos = [chat.encode_conversation(tokenizer, e["messages"])[0] for e in arithmetic_chat.splits(3, 0)[0]]
    seq_len = sum(map(len, convos)) + 3
    rows = chat.pack_conversations([(c, c) for c in convos], seq_len, tokenizer.pad_token_id).rows
    assert len(rows) == 1  # all three in one row
    batch = chat.to_batch(torch.from_numpy(rows))
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        # without the restarting positions the later conversations would see the earlier ones: a real difference
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        start = 0
        for c in convos:
            alone = model(input_ids=torch.tensor([c])).logits[0]
            torch.testing.assert_close(packed[start:start + len(c)], alone, rtol=1e-5, atol=1e-5)
            if start:
                assert (leaky[start:start + len(c)] - alone).abs().max() > 1e-3
            start += len(c)


def test_builtin_arithmetic_is_checkable_and_held_out():
    train, eval_ = arithmetic_chat.splits(2000, 200, seed=0, max_digits=2)
    assert len(train) == 2000 and len(eval_) == 200 and len({e["question"] for e in eval_}) == 200
    assert not {e["question"] for e in eval_} & {e["question"] for e in train}
    for e in train[:200] + eval_:
        assert arithmetic_chat.answer_of(e["question"]) == e["answer"] == int(e["messages"][1]["content"])
        assert int(e["rejected"][1]["content"]) != e["answer"]
        assert e["rejected"][0] == e["messages"][0]
    assert arithmetic_chat.answer_of("What is 37+45?") == 82 and arithmetic_chat.answer_of("hello") is None
    assert arithmetic_chat.splits(5, 5, seed=1) == arithmetic_chat.splits(5, 5, seed=1)  # deterministic


def test_preference_rows_pair_chosen_with_rejected(tokenizer):
    train, _ = arithmetic_chat.splits(4, 0)
    rows = chat.preference_rows(tokenizer, [(e["messages"], e["rejected"]) for e in train], 32).rows
    assert rows.shape == (4, 2, 3, 32)
    batch = chat.to_batch(torch.from_numpy(rows))
    assert batch["input_ids"].shape == (8, 32)
    for i, e in enumerate(train):
        chosen = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        rejected = batch["labels"][4 + i][batch["labels"][4 + i] != IGNORE_INDEX]
        assert tokenizer.decode(chosen) == f"{e['answer']}<|endoftext|>"
        assert tokenizer.decode(rejected) == f"{e['rejected'][1]['content']}<|endoftext|>"


def test_bad_messages_name_the_key():
    from effitrain.registry import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.messages\[0\].role: 'bot' is not one of system, user, assistant"):
        chat.check_messages([{"role": "bot", "content": "x"}], "dataset.messages")
    with pytest.raises(ConfigError, match="no assistant message"):
        chat.check_messages([{"role": "user", "content": "x"}], "dataset.messages")


# ---------------------------------------------------------------------------------------------------- objectives

def objective(name: str, model=None, **params):
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    return REGISTRY.parse("objective", {"name": name, **params}).build(model=model, device="cpu",
                                                                       bf16_supported=False)


def response_logp(model, ids: list[int], labels: list[int]) -> float:
    """log pi(response | prompt) by hand: the sum over labelled positions t of log softmax(logits[t-1])[ids[t]]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, len(ids))
               if labels[t] != IGNORE_INDEX)


def pair_batch(tokenizer, examples, seq_len: int = 24):
    rows = chat.preference_rows(tokenizer, [(e["messages"], e["rejected"]) for e in examples], seq_len).rows
    return chat.to_batch(torch.from_numpy(rows))


def test_sft_is_the_mean_loss_over_assistant_tokens(tokenizer):
    model = tiny_llama(len(tokenizer))
    convos = [chat.encode_conversation(tokenizer, e["messages"]) for e in arithmetic_chat.splits(4, 0)[0]]
    rows = chat.pack_conversations(convos, 40, tokenizer.pad_token_id).rows
    loss, metrics = objective("sft")(model, chat.to_batch(torch.from_numpy(rows)), None)
    # by hand, conversation by conversation alone: -sum of log-probs of the assistant tokens / their count
    total = sum(response_logp(model, ids, labels) for ids, labels in convos)
    count = sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for _, labels in convos)
    assert int(metrics["assistant_tokens"]) == count
    assert loss.item() == pytest.approx(-total / count, rel=1e-5)


def test_dpo_loss_on_a_hand_built_pair_is_the_closed_form(tokenizer):
    model = tiny_llama(len(tokenizer), seed=0)
    dpo = objective("dpo", model=model, beta=0.5)
    assert not any(p.requires_grad for p in dpo.reference.parameters()) and not dpo.reference.training
    with torch.no_grad():  # the policy moves away from its start; the reference stays the start model
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    example = arithmetic_chat.splits(1, 0)[0][0]
    batch = pair_batch(tokenizer, [example])
    loss, metrics = dpo(model, batch, None)
    chosen, rejected = (chat.encode_conversation(tokenizer, example[k]) for k in ("messages", "rejected"))
    start = tiny_llama(len(tokenizer), seed=0)
    pw, pl = response_logp(model, *chosen), response_logp(model, *rejected)
    rw, rl = response_logp(start, *chosen), response_logp(start, *rejected)
    margin = 0.5 * ((pw - rw) - (pl - rl))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx(margin, rel=1e-4)
    assert metrics["reward_accuracy"].item() == float(margin > 0)
    # at the start (policy == reference) every pair's loss is log 2
    fresh = tiny_llama(len(tokenizer), seed=3)
    loss0, _ = objective("dpo", model=fresh)(fresh, pair_batch(tokenizer, arithmetic_chat.splits(3, 0)[0]), None)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-6)


def test_length_normalized_dpo_and_simpo_divide_by_the_response_length(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    example = arithmetic_chat.splits(1, 0)[0][0]
    batch = pair_batch(tokenizer, [example])
    chosen, rejected = (chat.encode_conversation(tokenizer, example[k]) for k in ("messages", "rejected"))
    n_w, n_l = (sum(1 for label in c[1][1:] if label != IGNORE_INDEX) for c in (chosen, rejected))
    avg_w, avg_l = response_logp(model, *chosen) / n_w, response_logp(model, *rejected) / n_l
    loss, _ = objective("simpo", beta=2.0, gamma_beta_ratio=0.5)(model, batch, None)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-(2.0 * (avg_w - avg_l) - 1.0))), rel=1e-5)
    dpo = objective("dpo", model=tiny_llama(len(tokenizer), seed=2), beta=5.0, length_normalized=True)
    start = tiny_llama(len(tokenizer), seed=2)
    ref_w, ref_l = response_logp(start, *chosen) / n_w, response_logp(start, *rejected) / n_l
    margin = 5.0 * ((avg_w - ref_w) - (avg_l - ref_l))
    assert dpo(model, batch, None)[0].item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-5)


def test_bad_objective_parameters_name_the_key():
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY, ConfigError

    load_builtin_blocks()
    with pytest.raises(ConfigError, match="beta"):
        REGISTRY.parse("objective", {"name": "dpo", "beta": -1})
    with pytest.raises(ConfigError, match="gama_beta_ratio"):
        REGISTRY.parse("objective", {"name": "simpo", "gama_beta_ratio": 1})


def test_dpo_loss_equals_trl_on_identical_inputs(tokenizer, tmp_path):
    """TRL's DPOTrainer (sigmoid loss) and ours score the same collated pair with the same policy and reference."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[dev]' brings it)")
    import copy

    import datasets

    model = tiny_llama(len(tokenizer), seed=4)
    ours = objective("dpo", model=model, beta=0.3)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(5)))
    example = arithmetic_chat.splits(1, 0)[0][0]
    prompt = chat.prompt_ids(tokenizer, example["messages"][:1])
    completions = [chat.encode_conversation(tokenizer, example[k])[0][len(prompt):] for k in ("messages", "rejected")]
    text = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # TRL wants a dataset
    trainer = trl.DPOTrainer(model=model, ref_model=reference, train_dataset=text, processing_class=tokenizer,
                             args=trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True,
                                                bf16=False))
    inputs = trainer.data_collator([{"prompt_ids": prompt, "chosen_ids": completions[0],
                                     "rejected_ids": completions[1]}])
    theirs = trainer.compute_loss(trainer.model, dict(inputs))
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "labels": inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)}
    loss, _ = ours(model, batch, None)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-4  # the policy moved: not the trivial value at the start


# ---------------------------------------------------------------------------------------------------- answer accuracy

def test_exact_answer_match_on_correct_wrong_and_malformed_answers():
    from effitrain.methods.answer_accuracy import is_exact_answer

    assert is_exact_answer("82", 82) and is_exact_answer(" 82\n", 82) and is_exact_answer("-7", -7)
    assert not is_exact_answer("83", 82) and not is_exact_answer("7", -7)          # wrong
    assert not any(is_exact_answer(t, 82) for t in ("82.", "8 2", "", "082", "82 apples", "+82"))  # malformed


def test_batched_greedy_answers_equal_each_prompt_answered_alone(tokenizer):
    """Left padding with an attention mask: a question's greedy answer does not depend on its batch."""
    from effitrain.methods.answer_accuracy import AnswerAccuracy

    model = tiny_llama(len(tokenizer), seed=6)
    hook = AnswerAccuracy(tokenizer, examples=6, max_new_tokens=5, batch_size=6)
    questions = arithmetic_chat.splits(0, 6)[1]
    prompts = [chat.prompt_ids(tokenizer, e["messages"][:1]) for e in questions]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so some are padded
    batched, lengths = hook.responses(model, prompts)
    alone = [hook.responses(model, [p])[0][0] for p in prompts]
    assert batched == alone and all(1 <= n <= 5 for n in lengths)


@pytest.mark.parametrize("overrides, message", [
    (["objective=dpo", "dataset=chat_demo"], "objective=dpo trains on (chosen, rejected) pairs; use a chat dataset "
                                             "with dataset.format=preference"),
    (["objective=sft"], "objective=sft trains on the assistant tokens of conversations; use a chat dataset"),
    (["dataset=chat_demo", "dataset.format=preference"], "which objective=causal_lm would train on alike"),
    (["dataset=chat_demo", "dataset.format=pairs"], "dataset.format: 'pairs' is not one of"),
    (["+methods.answer_accuracy={}"], "methods.answer_accuracy asks the built-in arithmetic questions, which "
                                      "dataset=demo does not have; switch it off with '~methods.answer_accuracy'"),
])
def test_mismatched_post_training_configs_are_one_line_before_any_run_dir(overrides, message, tmp_path):
    from conftest import effitrain_cli

    result = effitrain_cli(*overrides, f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_local_jsonl_and_dataset_folders_give_the_same_conversations(tmp_path):
    """chat_local reads JSONL; chat_hub reads through datasets.load_dataset (here a local folder, no download):
    the same records make the same documents; a bad record names its file and line."""
    import json

    from effitrain.data.chat_sources import build_chat_hub, build_chat_local
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY, ConfigError

    load_builtin_blocks()
    train, _ = arithmetic_chat.splits(12, 0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"chosen": e["messages"], "rejected": e["rejected"]}) + "\n"
                                                for e in train))
    common = {"format": "preference", "eval_examples_per_domain": 2}
    local = build_chat_local(REGISTRY.parse("dataset", {"name": "chat_local", "path": str(folder / "train.jsonl"),
                                                        **common}).params)
    hub = build_chat_hub(REGISTRY.parse("dataset", {"name": "chat_hub", "path": str(folder), **common}).params)
    assert len(local["train"]) == len(hub["train"]) == 10 and len(local["eval"]) == 2
    # (the held-out pairs are chosen by a hash of the ids, which differ by source: compare train + eval)
    for column in ("text", "messages", "rejected"):
        assert sorted([*local["train"][column], *local["eval"][column]]) == \
            sorted([*hub["train"][column], *hub["eval"][column]])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": train[0]["messages"],
                               "rejected": [{"role": "user", "content": "other"}, train[0]["rejected"][1]]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl' line 1\): chosen and rejected must share their prompt"):
        build_chat_local(REGISTRY.parse("dataset", {"name": "chat_local", "path": str(bad), **common}).params)


def test_chat_rows_are_built_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    """Every stage and rank of a pipeline asks for the same rows: the second build reads them from the cache (the
    conversations are not rendered and tokenized again) and gives the same rows; another seq_len is a new entry."""
    from effitrain.data import chat_sources
    from effitrain.data.packing import to_numpy
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    data = REGISTRY.parse("dataset", {"name": "chat_demo", "max_docs_per_domain": 60, "eval_examples_per_domain": 4,
                                      "seq_len": 64})
    model = REGISTRY.parse("model", {"name": "llama", "vocab_size": 300}).params
    raw = data.build()
    encoded = []
    real_encode = chat.encode_conversation
    monkeypatch.setattr(chat, "encode_conversation", lambda *a: encoded.append(1) or real_encode(*a))

    _, first, first_eval = chat_sources.build_chat_splits(data.params, model, raw, cache_dir=tmp_path)
    built = len(encoded)
    _, again, again_eval = chat_sources.build_chat_splits(data.params, model, raw, cache_dir=tmp_path)
    assert built >= 60 + 4 and len(encoded) == built          # the second build encoded nothing
    assert (to_numpy(again) == to_numpy(first)).all()
    assert all((to_numpy(again_eval[d]) == to_numpy(first_eval[d])).all() for d in first_eval)
    longer = REGISTRY.parse("dataset", {"name": "chat_demo", "max_docs_per_domain": 60,
                                        "eval_examples_per_domain": 4, "seq_len": 96}).params
    chat_sources.build_chat_splits(longer, model, raw, cache_dir=tmp_path)
    assert len(encoded) > built
