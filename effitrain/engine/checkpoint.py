"""Atomic checkpoints: write into a temporary folder, mark it complete, then rename it into place.

A checkpoint is a folder ``checkpoints/step_00000100`` holding DeepSpeed's own files (model, optimizer and
scheduler state, under ``ds/``), one ``rank{r}.pt`` per process (RNG states) and ``state.pt`` (step counters, the
sampler's and every hook's state), and finally a ``COMPLETE`` marker.  Until the rename, the folder is called
``.tmp-step_00000100`` and is ignored by :func:`latest_checkpoint`, so a process killed in the middle of a save never
spoils the newest good checkpoint.

Every checkpoint is also **verifiable**: before the marker is written, ``meta.json`` records the size and SHA-256
of every file in the folder.  :func:`verify_checkpoint` checks them before a resume trusts the folder, and
:func:`newest_verified_checkpoint` falls back, one line per damaged checkpoint, to the newest one that verifies.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from effitrain.fsutil import fsync_dir, sha256_file
from effitrain.run_layout import CHECKPOINTS, COMPLETE, META, complete_checkpoints, is_complete, step_dir_name

class CheckpointDamaged(Exception):
    """A checkpoint folder whose files do not match the sizes and checksums recorded when it was written."""


class DiskFull(OSError):
    """A checkpoint did not fit on the disk; the partial folder was removed, the previous checkpoints are intact."""

    def __init__(self, root: Path, step: int, free: int, needed: int) -> None:
        mib = 2 ** 20
        super().__init__(f"checkpoint: the disk under '{root}' is full while saving step {step} "
                         f"({free / mib:.1f} MiB free, a checkpoint needs about {needed / mib:.1f} MiB); "
                         f"the previous checkpoints are intact; free some space, then resume=auto")
def newest_sampler_state(run_dir: Path) -> Optional[dict[str, Any]]:
    """The data sampler's state saved in the newest complete, verified checkpoint of ``run_dir`` (None without one):
    where that run's data stream stopped."""
    import torch

    newest = newest_verified_checkpoint(run_dir / CHECKPOINTS, report=lambda line: None)
    if newest is None:
        return None
    return torch.load(newest / "state.pt", weights_only=False)["sampler"]


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of every file under ``folder`` (marker and meta aside)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (COMPLETE, META):
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def checkpoint_bytes(path: Path) -> int:
    """The recorded size of a checkpoint (its files' bytes), or what is on disk for one without a record."""
    try:
        files = json.loads((path / META).read_text()).get("files") or {}
        if files:
            return sum(f["bytes"] for f in files.values())
    except (OSError, ValueError):
        pass
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointDamaged` naming the first problem: missing marker or metadata, a missing, resized
    or altered file.  Sizes are compared first (cheap), then checksums."""
    name = path.name
    if not is_complete(path):
        raise CheckpointDamaged(f"checkpoint {name} is incomplete (no {COMPLETE} marker)")
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
    except FileNotFoundError:
        raise CheckpointDamaged(f"checkpoint {name} has no {META}") from None
    except KeyError:
        if isinstance(meta, dict) and "step" in meta:  # written before checksums were recorded: trusted as is
            return
        raise CheckpointDamaged(f"checkpoint {name}: {META} is unreadable") from None
    except (OSError, ValueError, TypeError):
        raise CheckpointDamaged(f"checkpoint {name}: {META} is unreadable") from None
    if not files:
        raise CheckpointDamaged(f"checkpoint {name}: {META} lists no files")
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointDamaged(f"checkpoint {name}: {rel} is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointDamaged(f"checkpoint {name}: {rel} has {size} bytes, {want['bytes']} were written")
    for rel, want in files.items():
        if sha256_file(path / rel) != want["sha256"]:
            raise CheckpointDamaged(f"checkpoint {name}: {rel} does not match its checksum")


def newest_verified_checkpoint(root: Path, report: Callable[[str], None] = print) -> Optional[Path]:
    """The newest complete checkpoint whose files verify; each damaged newer one is reported in one line."""
    for _, path in reversed(complete_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointDamaged as exc:
            report(f"warning: {exc}; trying the previous checkpoint")
    return None


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
    try:
        write(tmp)
        barrier()
        if is_writer:
            seal(tmp, step, meta)
    except Exception as exc:
        _raise_disk_full_or(exc, root, tmp, step)
    if is_writer:
        if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
            trash = root / f".trash-{final.name}-{time.time_ns()}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
    barrier()
    return final


def _raise_disk_full_or(exc: Exception, root: Path, tmp: Path, step: int) -> None:
    """A failed save leaves no partial folder.  Libraries word a full disk differently (torch.save raises
    "file write failed" without an errno), so the disk itself is asked: almost no free space means it was full."""
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(root).free < 2 ** 20
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
    if not full:
        shutil.rmtree(tmp, ignore_errors=True)
        raise exc
    # The failed writer's frames (held by the traceback) keep its open files, and so their disk space: drop them.
    chained: Optional[BaseException] = exc
    while chained is not None:
        chained.__traceback__ = None
        chained = chained.__context__
    gc.collect()
    shutil.rmtree(tmp, ignore_errors=True)
    previous = complete_checkpoints(root)
    needed = max(written, checkpoint_bytes(previous[-1][1]) if previous else 0)
    raise DiskFull(root, step, shutil.disk_usage(root).free, needed) from None


def seal(tmp: Path, step: int, meta: Optional[dict[str, Any]]) -> None:
    """Record the files' sizes and checksums, then write the marker: from here on the folder is a checkpoint."""
    record = {"step": step, "time": time.time(), **(meta or {}), "files": file_manifest(tmp)}
    with open(tmp / META, "w") as fh:
        fh.write(json.dumps(record, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    marker = tmp / COMPLETE
    with open(marker, "w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (renamed aside first, so deletion is never partial
    on a folder that still looks complete)."""
    for _, path in complete_checkpoints(root)[:-keep]:
        for folder in (path, path.with_name(path.name + ".universal")):  # and its elastic-resume conversion
            if folder.exists():
                trash = root / f".trash-{folder.name}"
                folder.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
