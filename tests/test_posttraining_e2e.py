"""Post-training recipes end to end on the built-in instructions: ``sft`` trains on the assistant tokens, ``dpo``
runs its SFT stage then DPO against the frozen start model, and survives SIGKILL + resume in its DPO stage with the
losses of the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, effitrain_cli, sigkill_at

pytestmark = pytest.mark.slow


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_recipe_trains_on_the_assistant_tokens(tmp_path, train_in_process):
    summary = train_in_process(["+recipe=sft", "train.max_steps=3"], tmp_path / "run")
    assert summary["finished"] and summary["recipe"] == ["sft"] and summary["steps"] == 3
    lines = [m for m in _metrics(tmp_path / "run") if "loss" in m]
    # every packed row holds several conversations, each with a few assistant tokens; far fewer than all tokens
    assert all(0 < m["assistant_tokens"] < 4 * 63 for m in lines)
    # the recipe's generation-based evaluation answered the held-out questions at the final evaluation
    evals = [m for m in _metrics(tmp_path / "run") if "eval_accuracy" in m]
    assert evals and all(0 <= m["eval_accuracy"] <= 1 and 1 <= m["eval_response_tokens"] <= 8 for m in evals)


def test_dpo_recipe_runs_sft_then_dpo_from_the_sft_model(tmp_path, train_in_process):
    summary = train_in_process(["+recipe=dpo", "train.max_steps=3"], tmp_path / "run")
    assert summary["finished"] and [r["stage"] for r in summary["stages"]] == ["sft", "dpo"]
    dpo = _metrics(tmp_path / "run" / "stages" / "02-dpo")
    first = next(m for m in dpo if "loss" in m)
    # the first step's policy is the reference: every pair's loss is log 2 and the implicit rewards are 0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and abs(first["reward_margin"]) < 1e-5
    assert {"reward_chosen", "reward_rejected", "reward_accuracy"} <= set(first)


def test_sigkill_in_the_dpo_stage_then_resume_gives_the_uninterrupted_losses(tmp_path):
    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=dpo", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=2",
                "stages.1.train.max_steps=12", "+stages.1.train.save_every=4", "train.keep_checkpoints=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]

    sigkill_at([*run_args, f"run_dir={killed}"], killed / "stages" / "02-dpo" / "checkpoints" / "step_00000004" / "COMPLETE")

    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "step_00000004" in result.stdout
    expected = {m["step"]: m["loss"] for m in _metrics(full / "stages" / "02-dpo") if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in _metrics(killed / "stages" / "02-dpo") if "loss" in m}
    assert sorted(resumed) == sorted(expected) and max(expected) == 12
    for step in range(5, 13):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def test_tulu3_runs_sft_dpo_rlvr_and_survives_sigkill_in_the_rl_stage(tmp_path):
    """The three stages run in order on the built-in data, the RL stage from the DPO model; killed in the RL stage
    and resumed, it repeats the uninterrupted run's losses and rewards exactly (the samples are seeded by the
    micro-step, not by the process's RNG stream).  A model this small never answers right, so the verifiable reward
    alone would give every completion 0 and the RL stage nothing to learn; the test adds the length reward, whose
    values differ within a group, so the updates (and what resume must repeat) are real.  With iterations=2 the
    checkpoint at step 3 falls inside a sampling cycle: the resumed step 4 must reuse the samples of step 3, which
    the checkpoint keeps."""
    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=tulu3", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=20",
                "stages.1.train.max_steps=2", "stages.2.train.max_steps=6", "+stages.2.train.save_every=3",
                "stages.2.objective.group_size=4", "stages.2.objective.max_new_tokens=4",
                "stages.2.objective.rewards=[{name:exact_answer,correct:10.0},{name:length,max_tokens:4,gated:false}]",
                "stages.2.objective.iterations=2",  # samples reused for 2 steps: the kill at step 3 is mid-cycle
                # 4 new tokens cut almost every answer before its EOS, and the recipe's non-stop penalty would then
                # give every sample -10 (no signal): off here, tested in tests/test_grpo.py
                "stages.2.objective.no_eos_reward=null",
                "methods.answer_accuracy.examples=4", "train.keep_checkpoints=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((full / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["sft", "dpo", "rlvr"]
    rl = [m for m in _metrics(full / "stages" / "03-rlvr") if "loss" in m]
    # every step sampled 4 x 4 completions and scored them with Tülu 3's verifiable reward (0 or 10) and the length
    assert all(0 <= m["reward_exact_answer"] <= 10 and -1 <= m["reward_length"] <= 1 for m in rl)
    assert all(m["reward"] == pytest.approx(m["reward_exact_answer"] + m["reward_length"], abs=1e-6) for m in rl)
    assert all(1 <= m["completion_tokens"] <= 4 for m in rl)
    assert any(m["loss"] != 0 for m in rl) and rl[-1]["kl"] > 0   # the policy moved away from the DPO model
    # the second step of each cycle reuses the first's samples: the same rewards and lengths
    assert [m["reward"] for m in rl[1::2]] == [m["reward"] for m in rl[0::2]]
    evals = [m for m in _metrics(full / "stages" / "03-rlvr") if "eval_reward" in m]
    assert evals and all(m["eval_reward_exact_answer"] == pytest.approx(10 * m["eval_accuracy"]) for m in evals)

    marker = killed / "stages" / "03-rlvr" / "checkpoints" / "step_00000003" / "COMPLETE"
    sigkill_at([*run_args, f"run_dir={killed}"], marker)
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step_00000003" in result.stdout
    expected = {m["step"]: (m["loss"], m["reward"], m["kl"]) for m in rl}
    resumed = {m["step"]: (m["loss"], m["reward"], m["kl"])
               for m in _metrics(killed / "stages" / "03-rlvr") if "loss" in m}
    assert sorted(resumed) == sorted(expected) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def test_format_length_grpo_rewards_format_then_length_without_the_answers(tmp_path, train_in_process):
    overrides = ["+recipe=format_length_grpo", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=2",
                 "stages.1.train.max_steps=2", "stages.2.train.max_steps=2", "methods.answer_accuracy.examples=4",
                 "stages.1.objective.group_size=4", "stages.2.objective.group_size=4"]
    summary = train_in_process(overrides, tmp_path / "run")
    assert [r["stage"] for r in summary["stages"]] == ["sft", "format", "format_length"]
    fmt = [m for m in _metrics(tmp_path / "run" / "stages" / "02-format") if "loss" in m]
    both = [m for m in _metrics(tmp_path / "run" / "stages" / "03-format_length") if "loss" in m]
    assert all(set(m) >= {"reward_format"} and "reward_length" not in m for m in fmt)
    assert all(m["reward"] == pytest.approx(m["reward_format"] + m["reward_length"], abs=1e-6) for m in both)
    assert all(-1 <= m["reward_length"] <= 1 for m in both)
