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
