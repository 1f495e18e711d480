"""Thinkless (issue #27, item 3): control tokens, the warm-up pairs, the mode-aware reward and the recipe.

What holds: each built-in question gives a reasoning answer (worked steps, checked to reach the answer) and a
short one, each beginning with its control token, which the tokenizer holds as one id and decoding keeps; the
reward table is the authors'; ``answer_accuracy`` reports the share of each mode; the recipe passes check and its
misuse is refused there; its decoupled GRPO stage killed mid-stage resumes with the same losses.  The loss itself:
tests/test_token_weights.py.
"""

from __future__ import annotations

import json
import re

import pytest

from effitrain.config.blocks import load_builtin_blocks
from effitrain.data import arithmetic_chat
from effitrain.objectives.rewards import build_rewards
from effitrain.registry import REGISTRY, ConfigError

load_builtin_blocks()


def test_each_question_gives_a_worked_reasoning_and_a_short_answer():
    train, held_out = arithmetic_chat.splits(40, 10, style="thinkless")
    assert len(train) == 40 and not {e["question"] for e in train} & {e["question"] for e in held_out}
    for think, short in zip(train[::2], train[1::2]):
        assert think["question"] == short["question"] and think["id"].endswith("-think")
        answer = think["answer"]
        assert short["messages"][1]["content"] == f"<short>\\boxed{{{answer}}}"
        text = think["messages"][1]["content"]
        assert text.startswith("<think>") and text.endswith(f"</think> \\boxed{{{answer}}}")
        # every step is true arithmetic, and the last one reaches the answer
        steps = re.findall(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", text)
        assert steps and int(steps[-1][3]) == answer
        for a, op, b, result in steps:
            a, b = int(a), int(b)
            assert int(result) == (a + b if op == "+" else a - b if op == "-" else a * b), text
    assert arithmetic_chat.worked_steps("What is 37+45?") == "37+45: 37+40=77, 77+5=82"
    assert arithmetic_chat.worked_steps("What is 37*4?") == "37*4: 30*4=120, 7*4=28, 120+28=148"


def test_the_control_tokens_are_one_id_each_and_decoding_keeps_them(tmp_path):
    import datasets
    import transformers

    from effitrain.data.tokenizer import train_bpe

    train, _ = arithmetic_chat.splits(200, 0, style="thinkless")
    folder = str(tmp_path)
    train_bpe(datasets.Dataset.from_dict({"text": [e["messages"][1]["content"] for e in train]}), 300, folder)
    tok = arithmetic_chat.add_control_tokens(transformers.PreTrainedTokenizerFast.from_pretrained(folder))
    short_id, think_id = tok.convert_tokens_to_ids(["<short>", "<think>"])
    assert short_id != think_id and min(short_id, think_id) >= 300 - 10  # new ids after the trained vocabulary
    ids = tok("<short>\\boxed{82}", add_special_tokens=False)["input_ids"]
    assert ids[0] == short_id and short_id not in ids[1:]
    assert tok("x<think>37", add_special_tokens=False)["input_ids"].count(think_id) == 1
    assert tok.decode(ids, skip_special_tokens=True).startswith("<short>")


@pytest.mark.parametrize("response, expected", [
    ("<short>\\boxed{82}", 1.0),                                 # right and short
    ("<think>37+45: 37+40=77, 77+5=82</think> \\boxed{82}", 0.5),  # right after reasoning
    ("<short>\\boxed{81}", -1.0),                                # wrong and short
    ("<think>37+45</think> \\boxed{80}", -1.0),                  # wrong after reasoning
    ("<think>37+45 \\boxed{82}", -1.0),                          # reasoning never closed: a format error
    ("\\boxed{82}", -1.0),                                       # no control token
    ("<short>82", -1.0),                                         # no boxed answer
    ("<think>... \\boxed{82}</think> \\boxed{80}", -1.0),        # the answer is the one after </think>
])
def test_the_reward_table_is_the_authors(response, expected):
    [(name, weight, fn)] = build_rewards([REGISTRY.parse("reward", {"name": "thinkless"}, "rewards[0]")])
    assert fn([response], ["<short>\\boxed{82}"], [5]) == [expected]
    assert fn([response], ["82"], [5]) == [expected]  # a bare reference number reads the same


def test_a_custom_table_keeps_right_short_at_least_right_long_above_wrong():
    [(_, _, fn)] = build_rewards([REGISTRY.parse("reward", {"name": "thinkless", "correct_think": 1.0},
                                                 "rewards[0]")])
    assert fn(["<think>a</think> \\boxed{9}", "<short>\\boxed{9}"], ["9", "9"], [4, 3]) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="correct_short >= correct_think"):
        REGISTRY.parse("reward", {"name": "thinkless", "correct_think": 2.0}, "rewards[0]")
    with pytest.raises(ConfigError, match="correct_short >= correct_think > wrong"):
        REGISTRY.parse("reward", {"name": "thinkless", "wrong_short": 0.5}, "rewards[0]")


def test_answer_accuracy_reports_the_share_and_accuracy_of_each_mode():
    from effitrain.methods.answer_accuracy import AnswerAccuracy

    hook = AnswerAccuracy(None, examples=4, max_new_tokens=8, batch_size=4, extract="boxed",
                          control_tokens=("<short>", "<think>"))
    hook.answers = [82, 9, 5, 7]
    figures = hook.mode_metrics(["<short>\\boxed{82}", "<short>\\boxed{8}", "<think>2+3</think> \\boxed{5}",
                                 "\\boxed{7}"])
    assert figures == pytest.approx({"eval_share_short": 0.5, "eval_accuracy_short": 0.5,
                                     "eval_share_think": 0.25, "eval_accuracy_think": 1.0})


def test_the_recipe_passes_check_and_misuse_is_refused():
    from conftest import effitrain_cli

    ok = effitrain_cli("check", "+recipe=thinkless")
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = effitrain_cli("check", "+recipe=thinkless", "dataset.answer_style=think_boxed")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "thinkless_needs_control_tokens" in bad.stderr and "answer_style=thinkless" in bad.stderr
    mixed = effitrain_cli("check", "+recipe=thinkless", "+stages.1.objective.loss_type=bnpo")
    assert mixed.returncode == 2 and "decoupled_response=sequence|token" in mixed.stderr


@pytest.mark.slow
def test_sigkill_in_the_degrpo_stage_then_resume_repeats_the_losses(tmp_path):
    """The recipe, tiny, its decoupled GRPO stage killed right after its step-3 checkpoint and resumed: steps 4-6
    log the same losses and rewards as the uninterrupted run."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=thinkless", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=10",
                "stages.1.train.max_steps=6", "+stages.1.train.save_every=3", "stages.1.objective.group_size=4",
                "stages.1.objective.max_new_tokens=6", "methods.answer_accuracy.examples=4",
                # a model this small is never right (every thinkless reward -1): the length reward makes the
                # groups' rewards differ, so the advantages and the decoupled policy gradient are not zero
                "stages.1.objective.rewards=[{name:thinkless},{name:length,max_tokens:6,gated:false}]",
                "train.keep_checkpoints=3"]

    def metrics(run_dir):
        lines = (run_dir / "stages" / "02-degrpo" / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    assert len(expected) == 6 and any(m["reward_std"] > 0 for m in expected)
    sigkill_at([*run_args, f"run_dir={killed}"],
               killed / "stages" / "02-degrpo" / "checkpoints" / "step_00000003" / "COMPLETE")
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == list(range(1, 7))
    for m in expected[3:]:
        for key in ("loss", "reward", "completion_tokens"):
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)
