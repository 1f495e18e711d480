"""A run killed with SIGKILL and resumed sees exactly the batches, and logs exactly the losses, of an
uninterrupted run; a SIGKILL during a checkpoint write leaves the previous checkpoint usable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, TINY, effitrain_cli, sigkill_at, sigterm_after_step

pytestmark = pytest.mark.slow

RUN = [*TINY, "train.max_steps=40", "train.save_every=10", "train.keep_checkpoints=3", "train.eval_every=10",
       "optimizer.lr=3e-3"]


def _losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(l["step"], k): l[k] for l in lines for k in ("loss", "eval_loss") if k in l}


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*RUN, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]

    sigkill_at([*RUN, f"run_dir={killed}"], killed / "checkpoints" / "step_00000010" / "COMPLETE")
    logged = _losses(killed)
    assert max(step for step, _ in logged) < 40, "the run finished before it could be killed"

    # A second process dies half-way through writing the step-20 checkpoint.
    torn = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from effitrain.engine.checkpoint import write_atomically
        def die(tmp):
            (tmp / "ds").mkdir()
            (tmp / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomically(Path({str(killed / 'checkpoints')!r}), 20, die)
    """)
    assert subprocess.run([sys.executable, "-c", torn], cwd=REPO).returncode == -signal.SIGKILL

    result = effitrain_cli(*RUN, f"run_dir={killed}", "resume=auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "step_00000010" in result.stdout

    expected, resumed = _losses(full), _losses(killed)
    assert set(resumed) == set(expected)
    later = [key for key in expected if key[0] > 10]
    assert len(later) >= 30
    for key in later:
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key


def test_resume_remembers_the_recipe_and_follows_a_new_horizon_as_declared(tmp_path):
    """`effitrain resume RUN_DIR` needs no recipe on the command line: it continues exactly like the run that was
    never interrupted.  Extending `train.max_steps` re-plans the schedule for the new horizon and says so."""
    import shutil

    from effitrain.optim.schedules import WarmupStableDecay

    run = [*TINY, "+recipe=wsd", "scheduler.warmup_steps=4", "train.max_steps=20", "train.save_every=10",
           "train.eval_every=10"]
    full = tmp_path / "full"
    assert effitrain_cli(*run, f"run_dir={full}").returncode == 0

    stopped = tmp_path / "stopped"   # the same run as if it had been stopped right after its step-10 checkpoint
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step_00000020")
    result = effitrain_cli("resume", str(stopped))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "at step 10" in result.stdout
    expected, resumed = _losses(full), _losses(stopped)
    assert set(resumed) == set(expected)
    for key in [k for k in expected if k[0] > 10]:
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key

    result = effitrain_cli(f"run_dir={full}", "resume=auto", "train.max_steps=30")   # the same, spelled as overrides
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WarmupStableDecay schedule now spans from 20 to 30 steps" in result.stdout
    peak, declared = 3e-3, WarmupStableDecay(4, 30, 0.1, round(0.1 * 30), "exp")
    logged = {l["step"]: l["lr"] for l in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
              if "lr" in l}
    assert sorted(logged) == list(range(1, 31))
    for step in range(21, 31):
        assert logged[step] == pytest.approx(peak * declared(step), rel=1e-6), step
    assert logged[21] == pytest.approx(peak)   # back in the stable phase: the decay moved to the new end


def test_a_wall_clock_cadence_saves_checkpoints_without_save_every(tmp_path, train_in_process):
    run = tmp_path / "run"
    train_in_process(["train.max_steps=3", "train.save_every=0", "train.save_every_minutes=1e-6",
                      "train.keep_checkpoints=5"], run)
    from effitrain.run_layout import complete_checkpoints
    assert [step for step, _ in complete_checkpoints(run / "checkpoints")] == [1, 2, 3]
    off = tmp_path / "off"
    train_in_process(["train.max_steps=3", "train.save_every=0", "train.save_every_minutes=0"], off)
    assert [step for step, _ in complete_checkpoints(off / "checkpoints")] == [3]   # only the final one


def test_a_stop_between_two_log_lines_logs_the_same_next_line_after_resume(tmp_path, train_in_process):
    """Stopped after step 6 of a run that logs every 4 steps, the resumed run's step-8 line is the mean over steps
    5-8, as in the run that never stopped (it was the mean over 7-8 only, 0.014 off in a GaLore run)."""
    run = ["train.max_steps=8", "train.log_every=4", "optimizer.lr=3e-3"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train_in_process(run, full)
    with sigterm_after_step(6):
        summary = train_in_process(run, stopped)
    assert summary["steps"] == 6 and not summary["finished"]
    assert [json.loads(l)["step"] for l in (stopped / "metrics.jsonl").read_text().splitlines()] == [0, 4]
    resumed = train_in_process([*run, "resume=auto"], stopped)
    assert resumed["finished"] and resumed["train_seconds"] > 0

    def values(run_dir):
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in l.items() if k in ("step", "loss", "lr", "grad_norm", "eval_loss")} for l in lines]

    assert values(stopped) == values(full)


def test_a_stage_whose_config_differs_points_at_resuming_its_pipeline(tmp_path):
    """A stage is resumed through its pipeline: the refusal names the pipeline's folder, not the stage's."""
    import yaml

    from effitrain.config.resume import check_resume_config
    from effitrain.registry import ConfigError

    pipeline = tmp_path / "r2"
    stage = pipeline / "stages" / "01-sft"
    stage.mkdir(parents=True)
    for folder in (pipeline, stage):
        (folder / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"lr": 0.1}}))
    with pytest.raises(ConfigError) as refused:
        check_resume_config(stage, {"optimizer": {"lr": 0.2}}, "auto", [])
    assert f"`effitrain resume {pipeline}`" in str(refused.value)
    assert "optimizer.lr: 0.1 -> 0.2" in str(refused.value)
    with pytest.raises(ConfigError) as plain:  # a run of its own keeps its own folder in the advice
        check_resume_config(pipeline, {"optimizer": {"lr": 0.2}}, "auto", [])
    assert f"`effitrain resume {pipeline}`" in str(plain.value)
