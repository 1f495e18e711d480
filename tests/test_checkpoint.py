"""Checkpoints are written atomically: a process killed mid-save never spoils the newest complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from effitrain.engine.checkpoint import prune, write_atomically
from effitrain.run_layout import complete_checkpoints, latest_checkpoint


def _write_files(tmp):
    (tmp / "weights.bin").write_bytes(b"x" * 1000)


def test_a_complete_checkpoint_has_its_marker_and_is_found(tmp_path):
    path = write_atomically(tmp_path, 10, _write_files)
    assert path.name == "step_00000010" and (path / "COMPLETE").is_file() and (path / "weights.bin").is_file()
    assert latest_checkpoint(tmp_path) == path


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    good = write_atomically(tmp_path, 10, _write_files)
    # A real process that starts the next save and is SIGKILLed half-way through writing it.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from effitrain.engine.checkpoint import write_atomically

        def write_then_die(tmp):
            (tmp / "weights.bin").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)

        write_atomically(Path({str(tmp_path)!r}), 20, write_then_die)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / ".tmp-step_00000020" / "weights.bin").read_bytes() == b"partial"  # the torn save is there
    assert latest_checkpoint(tmp_path) == good                                            # ...and ignored
    assert (good / "weights.bin").read_bytes() == b"x" * 1000
    # the next save of that step cleans the leftover and completes
    again = write_atomically(tmp_path, 20, _write_files)
    assert latest_checkpoint(tmp_path) == again and not (tmp_path / ".tmp-step_00000020").exists()


def test_pruning_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        write_atomically(tmp_path, step, _write_files)
    prune(tmp_path, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]
