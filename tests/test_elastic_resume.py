"""Elastic resume: a ZeRO-2 run saved by 2 processes continues with 1 (and the reverse) through DeepSpeed's universal
checkpoint, keeping the global batch by adjusting train.grad_accum, and its later losses equal the uninterrupted
run's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY
from effitrain.config.resume import keep_global_batch
from effitrain.engine.checkpoint import file_manifest, prune, verify_checkpoint
from effitrain.registry import ConfigError

# 6 steps of the tiny model under ZeRO-2, a checkpoint every 3: global batch 4 = 2 (micro) x accum x world
RUN = [*TINY, "train.max_steps=6", "train.micro_batch_size=2", "train.save_every=3", "parallelism=zero2",
       "train.save_final_model=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _cli(procs: int, *args: str) -> subprocess.CompletedProcess:
    launcher = TORCHRUN if procs == 2 else [sys.executable]
    result = subprocess.run([*launcher, "-m", "effitrain.cli", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _losses(run_dir) -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if "loss" in l}


def _interrupted_copy(run_dir, to):
    """The run as if it had been stopped right after its step-3 checkpoint."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(to / "checkpoints" / "step_00000006")
    (to / "summary.json").unlink()
    return to


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_to_one_and_one_to_two_continue_the_loss_curve(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    _cli(2, *RUN, "train.grad_accum=1", f"run_dir={two}")
    _cli(1, *RUN, "train.grad_accum=2", f"run_dir={one}")
    # the two layouts compute the same steps (tests/test_distributed.py): the curve to continue is well defined
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-4)

    # 2 -> 1: one command; resume chooses grad_accum 2 and converts the checkpoint
    resumed = _interrupted_copy(two, tmp_path / "two_to_one")
    original = resumed / "checkpoints" / "step_00000003"
    before = file_manifest(original)
    out = _cli(1, "resume", str(resumed))
    assert "resume: 2 -> 1 processes: train.grad_accum 1 -> 2 keeps the global batch at 4" in out.stdout + out.stderr
    assert "converting step_00000003 to DeepSpeed's universal format" in out.stdout + out.stderr
    after = _losses(resumed)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    # Exact up to float rounding: the same samples per step (the sampler converts its position), the fp32 master
    # weights and Adam moments restored whole; 1e-5 leaves room for the order of the gradient sums.
    assert [after[s] for s in (4, 5, 6)] == pytest.approx([_losses(two)[s] for s in (4, 5, 6)], abs=1e-5)
    # the original checkpoint is untouched; the conversion beside it is a verified checkpoint of its own
    assert file_manifest(original) == before
    verify_checkpoint(original)
    universal = resumed / "checkpoints" / "step_00000003.universal"
    verify_checkpoint(universal)
    assert json.loads((universal / "meta.json").read_text())["universal_of"] == "step_00000003"
    assert json.loads((resumed / "summary.json").read_text())["world_size"] == 1
    # the stored config is the original's; the launch's own (grad_accum 2) is beside it
    assert yaml.safe_load((resumed / "config.yaml").read_text())["train"]["grad_accum"] == 1
    assert yaml.safe_load((resumed / "config.resume.yaml").read_text())["train"]["grad_accum"] == 2

    # resuming from the same checkpoint again reuses the conversion
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    again = _cli(1, "resume", str(resumed))
    assert "reusing the universal checkpoint step_00000003.universal" in again.stdout + again.stderr
    assert _losses(resumed) == pytest.approx(after, abs=1e-6)

    # 1 -> 2, the reverse: grad_accum 2 -> 1
    reverse = _interrupted_copy(one, tmp_path / "one_to_two")
    out = _cli(2, "resume", str(reverse))
    assert "resume: 1 -> 2 processes: train.grad_accum 2 -> 1" in out.stdout + out.stderr
    later = _losses(reverse)
    assert [later[s] for s in (4, 5, 6)] == pytest.approx([_losses(one)[s] for s in (4, 5, 6)], abs=1e-5)
    assert json.loads((reverse / "summary.json").read_text())["world_size"] == 2


def _saved_run(tmp_path, *, world: int, micro: int, accum: int, stage: int = 2):
    """A run directory whose newest checkpoint records the layout it was saved with (what the loop writes)."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("ok\n")
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "world_size": world, "micro_batch_size": micro,
                                                "grad_accum": accum, "files": {}}))
    cfg = {"train": {"micro_batch_size": micro, "grad_accum": accum}, "parallelism": {"name": "zero", "stage": stage}}
    return run, cfg


def test_resume_keeps_the_global_batch_by_choosing_grad_accum(tmp_path):
    run, cfg = _saved_run(tmp_path, world=4, micro=2, accum=1)           # global batch 8
    assert keep_global_batch(run, cfg, 4) is None and cfg["train"]["grad_accum"] == 1   # same world: nothing to do
    line = keep_global_batch(run, cfg, 1)
    assert cfg["train"]["grad_accum"] == 4
    assert line == "resume: 4 -> 1 processes: train.grad_accum 1 -> 4 keeps the global batch at 8 (micro_batch_size 2)"


def test_resume_refuses_a_world_size_that_cannot_keep_the_global_batch(tmp_path):
    run, cfg = _saved_run(tmp_path, world=2, micro=2, accum=1)           # global batch 4
    with pytest.raises(ConfigError, match=r"^resume: the run was saved by 2 processes with global batch 4 \(micro_"
                                          r"batch_size 2 x grad_accum 1 x 2\); with 3 processes no whole "
                                          r"train.grad_accum keeps it; resume with a number of processes that "
                                          r"divides 2$"):
        keep_global_batch(run, cfg, 3)
    run3, cfg3 = _saved_run(tmp_path / "z3", world=2, micro=2, accum=1, stage=3)
    with pytest.raises(ConfigError, match="elastic resume supports ZeRO stages 0-2"):
        keep_global_batch(run3, cfg3, 1)


def test_prune_removes_a_checkpoint_together_with_its_universal_conversion(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        for name in (f"step_{step:08d}", f"step_{step:08d}.universal"):
            (root / name).mkdir(parents=True)
            (root / name / "COMPLETE").write_text("ok\n")
    prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006", "step_00000006.universal"]
