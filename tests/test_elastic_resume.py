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
from effitrain.engine.checkpoint import file_manifest, prune, seal, verify_checkpoint
from effitrain.engine.elastic import engine_checkpoint_for
from effitrain.registry import ConfigError

# 6 steps of the tiny model under ZeRO-2, a checkpoint every 2 (all kept): global batch 4 = 2 (micro) x accum x world
RUN = [*TINY, "train.max_steps=6", "train.micro_batch_size=2", "train.save_every=2", "train.keep_checkpoints=3",
       "parallelism=zero2", "train.save_final_model=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _cli(procs: int, *args: str) -> str:
    launcher = TORCHRUN if procs == 2 else [sys.executable]
    result = subprocess.run([*launcher, "-m", "effitrain.cli", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _losses(run_dir) -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if "loss" in l}


def _stopped_copy(run_dir, to, *, at: int):
    """The run as if it had been stopped right after its checkpoint at step ``at``."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1].split(".")[0]) > at:
            shutil.rmtree(ckpt)
    (to / "summary.json").unlink()
    return to


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_to_one_and_back_to_two_continue_the_loss_curve(tmp_path):
    """One uninterrupted 2-process run is the reference; a copy stopped at step 2 resumes with 1 process (which saves
    steps 4 and 6), and a copy of that stopped at step 4 resumes with 2 processes again."""
    two = tmp_path / "two"
    _cli(2, *RUN, "train.grad_accum=1", f"run_dir={two}")
    reference = _losses(two)

    # 2 -> 1: one command; resume chooses grad_accum 2 and converts the checkpoint
    one = _stopped_copy(two, tmp_path / "two_to_one", at=2)
    original = one / "checkpoints" / "step_00000002"
    before = file_manifest(original)
    out = _cli(1, "resume", str(one))
    assert "resume: 2 -> 1 processes: train.grad_accum 1 -> 2 keeps the global batch at 4" in out
    assert "converting step_00000002 to DeepSpeed's universal format" in out
    after = _losses(one)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    # Equal up to float rounding: the same samples per step (the sampler converts its position), the fp32 master
    # weights and Adam moments restored whole; 1e-5 leaves room for the order of the gradient sums.
    assert [after[s] for s in (3, 4, 5, 6)] == pytest.approx([reference[s] for s in (3, 4, 5, 6)], abs=1e-5)
    # the original checkpoint is untouched; the conversion beside it is a verified checkpoint of its own
    assert file_manifest(original) == before
    verify_checkpoint(original)
    universal = one / "checkpoints" / "step_00000002.universal"
    verify_checkpoint(universal)
    assert json.loads((universal / "meta.json").read_text())["universal_of"] == "step_00000002"
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1
    # the stored config is the first launch's; the resumed launch's own (grad_accum 2) is beside it
    assert yaml.safe_load((one / "config.yaml").read_text())["train"]["grad_accum"] == 1
    assert yaml.safe_load((one / "config.resume.yaml").read_text())["train"]["grad_accum"] == 2

    # 1 -> 2, the reverse, from the checkpoint the 1-process launch wrote at step 4
    back = _stopped_copy(one, tmp_path / "one_to_two", at=4)
    out = _cli(2, "resume", str(back))
    assert "resume: 1 -> 2 processes: train.grad_accum 2 -> 1 keeps the global batch at 4" in out
    later = _losses(back)
    assert [later[s] for s in (5, 6)] == pytest.approx([reference[s] for s in (5, 6)], abs=1e-5)
    assert json.loads((back / "summary.json").read_text())["world_size"] == 2


def test_a_complete_universal_conversion_is_reused_and_a_same_size_resume_needs_none(tmp_path):
    root = tmp_path / "checkpoints"
    saved = root / "step_00000002"
    (saved / "ds").mkdir(parents=True)
    (saved / "ds" / "weights").write_text("w")
    seal(saved, 2, {"world_size": 2})
    said: list[str] = []
    common = dict(zero_stage=2, is_main=True, barrier=lambda: None, report=said.append)
    assert engine_checkpoint_for(saved, world_size=2, **common) is None            # DeepSpeed's own files fit
    assert engine_checkpoint_for(saved, world_size=1, zero_stage=0, is_main=True, barrier=lambda: None,
                                 report=said.append) is None                      # ZeRO-0 state is not partitioned
    universal = root / "step_00000002.universal"
    (universal / "ds" / "zero").mkdir(parents=True)
    (universal / "ds" / "zero" / "optimizer_state.pt").write_text("s")
    seal(universal, 2, {"universal_of": saved.name})
    assert engine_checkpoint_for(saved, world_size=1, **common) == universal
    assert said == ["resume: 2 -> 1 processes: reusing the universal checkpoint step_00000002.universal"]


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


def test_a_composed_resume_at_another_world_size_is_sent_to_effitrain_resume(tmp_path, monkeypatch):
    from effitrain.config.resume import check_resume_config

    run, cfg = _saved_run(tmp_path, world=2, micro=2, accum=1)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"saved by 2 processes with global batch 4, which this launch's world "
                                          r"size changes; resume with `effitrain resume "):
        check_resume_config(run, cfg, "auto")
    check_resume_config(run, {**cfg, "train": {"micro_batch_size": 2, "grad_accum": 2}}, "auto")  # keeps 4: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_resume_config(run, cfg, "auto")                                                      # the saved layout
