"""A run killed with SIGKILL and resumed sees exactly the batches, and logs exactly the losses, of an
uninterrupted run; a SIGKILL during a checkpoint write leaves the previous checkpoint usable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, TINY, effitrain_cli

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

    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *RUN, f"run_dir={killed}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step_00000010" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
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
