"""A cluster's pre-emption signal, or Ctrl-C, saves a checkpoint and exits with the documented "resumable" status
(75); the optional trackers receive the log lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, effitrain_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_preemption_signal_or_ctrl_c_saves_a_checkpoint_and_exits_resumable(tmp_path, sig):
    run_dir = tmp_path / "run"
    args = [*TINY, "train.max_steps=100000", f"run_dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for l in metrics.read_text().splitlines() if '"loss"' in l) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert f"continue with: effitrain resume {run_dir}" in out and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["stopped_by"].startswith("signal")
    step = summary["steps"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()

    if sig != signal.SIGTERM:
        return  # what a resume does after the stop does not depend on the signal that stopped it: once is enough
    # the requeued job continues from that checkpoint
    result = effitrain_cli(*TINY, f"train.max_steps={step + 2}", f"run_dir={run_dir}", "resume=auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {step}" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 2


def test_tensorboard_logger_writes_event_files(tmp_path, train_in_process):
    run_dir = tmp_path / "run"
    train_in_process(["logger=tensorboard", "train.max_steps=2"], run_dir)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


def test_wandb_logger_runs_offline(tmp_path, train_in_process, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train_in_process(["logger=wandb", "train.max_steps=2"], run_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "wandb wrote no offline run"
    assert list(offline[0].glob("*.wandb"))
