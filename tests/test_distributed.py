"""Data parallel on CPU: ZeRO-2 with two processes equals one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY

pytestmark = pytest.mark.multiproc


def _train_losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if "loss" in l], [l["eval_loss"] for l in lines if "eval_loss" in l]


def test_zero2_on_two_processes_matches_one_process(tmp_path):
    common = [*TINY, "train.max_steps=6", "train.micro_batch_size=2", "optimizer.lr=3e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "effitrain.cli", *common, "parallelism=zero2", "train.grad_accum=1",
                             "train.global_batch_size=4", f"run_dir={two}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "effitrain.cli", *common, "parallelism=ddp", "train.grad_accum=2",
                             "train.global_batch_size=4", f"run_dir={one}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    loss_two, eval_two = _train_losses(two)
    loss_one, eval_one = _train_losses(one)
    assert len(loss_two) == len(loss_one) == 6
    assert loss_two == pytest.approx(loss_one, abs=1e-4)
    assert eval_two == pytest.approx(eval_one, abs=1e-4)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
