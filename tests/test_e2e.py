"""End to end through the real pipeline: demo corpus, BPE, packing, Llama, DeepSpeed, run directory."""

from __future__ import annotations

import json

import pytest

from conftest import effitrain_cli

pytestmark = pytest.mark.slow


def _lines(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_learns_and_leaves_a_complete_run_directory(tmp_path, train_in_process):
    run_dir = tmp_path / "run"
    summary = train_in_process(["train.max_steps=40", "train.eval_every=20", "train.log_every=10",
                                "optimizer.lr=3e-3"], run_dir)
    lines = _lines(run_dir)
    evals = [l for l in lines if "eval_loss" in l]
    assert [l["step"] for l in evals] == [0, 20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0  # clearly learning, not noise
    assert {"eval_loss/arithmetic", "eval_loss/code", "eval_loss/prose"} <= set(evals[-1])
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [10, 20, 30, 40]
    assert all(l["tokens_per_s"] > 0 and l["peak_memory_bytes"] > 0 for l in train_lines)

    for key in ("final_eval_loss", "steps", "tokens", "tokens_per_s", "peak_memory_bytes", "optimizer_state_bytes",
                "trainable_params", "total_params", "recipe", "world_size", "zero_stage"):
        assert key in summary, key
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 4 * 64
    # fp32 on CPU: one 4-byte gradient per trainable parameter in a step; DeepSpeed frees them after it
    assert summary["gradient_bytes_at_step"] == 4 * summary["trainable_params"]
    assert summary["final_eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40
    for name in ("config.yaml", "command.txt", "env.json"):
        assert (run_dir / name).is_file()
    assert (run_dir / "checkpoints" / "step_00000040" / "COMPLETE").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final_model")
    assert sum(p.numel() for p in model.parameters()) == summary["total_params"]
    assert tokenizer("def f(x):")["input_ids"]


def test_an_existing_run_is_never_overwritten_unless_asked(tmp_path, train_in_process):
    run_dir = tmp_path / "run"
    train_in_process(["train.max_steps=2"], run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    result = effitrain_cli(f"run_dir={run_dir}")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
    # resume=auto on a finished run trains nothing more
    summary = train_in_process(["train.max_steps=2", "resume=auto"], run_dir)
    assert summary["steps"] == 2


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, train_in_process):
    # An lr of 1e30 sends the weights to inf in one step; every later step is then non-finite.
    summary = train_in_process(["optimizer.lr=1e30", "train.clip_grad_norm=0", "train.max_steps=20",
                                "train.max_bad_steps=3"], tmp_path / "run")
    assert summary["finished"] is False
    assert "3 non-finite steps in a row" in summary["stopped_by"]
    assert summary["skipped_steps"] == 3


def test_a_hydra_sweep_runs_every_job_in_its_own_run_directory(tmp_path):
    from conftest import TINY

    result = effitrain_cli("-m", "+recipe=baseline,wsd", *TINY, "train.max_steps=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    recipes = [json.loads((tmp_path / str(job) / "summary.json").read_text())["recipe"] for job in (0, 1)]
    assert recipes == [["baseline"], ["wsd"]]


def test_a_sweep_with_one_bad_value_is_refused_before_any_job_starts(tmp_path):
    result = effitrain_cli("-m", "optimizer.lr=1e-3,abc", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 2 and "optimizer.lr: expected a number, got 'abc'" in result.stderr
    assert not tmp_path.joinpath("0").exists()


@pytest.mark.parametrize("overrides, eval_steps", [
    (["train.eval_every=5"], [2]),                                  # shorter than its interval: once, at the end
    (["train.eval_every=5", "train.eval_at_start=true"], [0, 2]),  # asked for: the curve's starting point too
    (["train.eval_every=0"], [0, 2]),                               # 0 keeps its meaning: the start and the end
])
def test_a_run_shorter_than_its_eval_interval_evaluates_only_at_the_end(tmp_path, train_in_process, overrides,
                                                                       eval_steps):
    run_dir = tmp_path / "run"
    train_in_process(["train.max_steps=2", *overrides], run_dir)
    assert [l["step"] for l in _lines(run_dir) if "eval_loss" in l] == eval_steps
