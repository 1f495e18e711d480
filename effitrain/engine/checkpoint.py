"""Atomic checkpoints: write into a temporary folder, mark it complete, then rename it into place.

A checkpoint is a folder ``checkpoints/step_00000100`` holding DeepSpeed's own files (model, optimizer and
scheduler state, under ``ds/``), one ``rank{r}.pt`` per process (RNG states) and ``state.pt`` (step counters, the
sampler's and every hook's state), and finally a ``COMPLETE`` marker.  Until the rename, the folder is called
``.tmp-step_00000100`` and is ignored by :func:`latest_checkpoint`, so a process killed in the middle of a save never
spoils the newest good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def write_atomically(root: Path, step: int, write: Callable[[Path], None], *, is_writer: bool = True,
                     barrier: Callable[[], None] = lambda: None, meta: Optional[dict[str, Any]] = None) -> Path:
    """Run ``write(tmp_dir)`` on every rank, then (on the writer rank) mark complete and rename into place.

    ``barrier`` synchronises the ranks around the shared folder; every rank must call this function.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a process that died mid-save
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_writer:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **(meta or {})}, indent=1))
        marker = tmp / COMPLETE
        with open(marker, "w") as fh:
            fh.write("ok\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
            trash = root / f".trash-{final.name}-{time.time_ns()}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
    barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (renamed aside first, so deletion is never partial
    on a folder that still looks complete)."""
    for _, path in complete_checkpoints(root)[:-keep]:
        trash = root / f".trash-{path.name}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
