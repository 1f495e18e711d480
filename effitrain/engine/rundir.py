"""The run directory: one live run per folder, never clobbered, recording how the run was made.

Three promises (docs/reliability.md):

* **A folder is a run only if it carries effitrain's marker** (``.effitrain-run``).  Nothing else counts: a folder
  of a user's files with a stray ``config.yaml`` in it is *not* a run, so neither ``overwrite=true`` nor a new run
  ever writes into it or deletes from it.  A run directory must be new, empty, or marked.
* **One live run per folder**: :class:`RunDirLock` holds an exclusive ``flock`` on ``.effitrain-lock`` for the
  run's life.  The kernel drops it when the process dies, however it dies, so a stale lock cannot block anybody;
  the file only records who holds it (pid, host) for the refusal message.
* **Overwrite moves aside, then deletes late**: ``overwrite=true`` renames the old run to a hidden sibling, starts
  the new run in a fresh folder, and deletes the old one only after the new run has taken its first step
  (:meth:`RunDirLock.commit_replacement`); a new run that fails before that is removed and the old one put back.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from effitrain.registry import ConfigError
from effitrain.run_layout import CHECKPOINTS, RECIPES_FILE, complete_checkpoints, is_complete

MARKER = ".effitrain-run"
LOCK = ".effitrain-lock"
_REPLACED = ".replaced-"
_PACKAGES = ("effitrain", "torch", "deepspeed", "transformers", "datasets", "tokenizers", "peft", "hydra-core",
             "omegaconf", "numpy", "bitsandbytes", "scikit-learn", "datasketch")


def holds_run(run_dir: Path) -> bool:
    """True only for a folder that effitrain itself marked as a run."""
    return (run_dir / MARKER).is_file()


def _resumable_legacy(run_dir: Path) -> bool:
    """A run made before the marker existed: it has complete checkpoints, which only effitrain writes."""
    return bool(complete_checkpoints(run_dir / CHECKPOINTS))


def _dangerous(run_dir: Path) -> Optional[str]:
    """Folders that are never a run directory: the filesystem root, the home folder, the current folder and any
    folder above them (a run there would mix its files with everything below)."""
    resolved = run_dir.expanduser().resolve()
    if resolved == Path(resolved.anchor):
        return "is the filesystem root"
    for name, place in (("the home folder", Path.home()), ("the current folder", Path.cwd())):
        place = place.resolve()
        if resolved == place:
            return f"is {name}"
        if resolved in place.parents:
            return f"contains {name}"
    return None


def _nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _foreign_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []


def check_run_dir(run_dir: Path, *, resume: Optional[str], overwrite: bool, locked_by_us: bool = False) -> None:
    """Pre-flight, read-only (so every rank agrees, and ``effitrain check`` can run it): is this folder usable?

    ``locked_by_us``: the caller already holds the folder's lock (the re-check under the lock)."""
    shown = str(run_dir)
    if os.path.lexists(run_dir) and not run_dir.exists():  # a symlink loop or a dangling link: say which
        from effitrain.fsutil import why_missing
        raise ConfigError(f"run_dir: '{shown}' {why_missing(run_dir)}")
    problem = _dangerous(run_dir)
    if problem:
        raise ConfigError(f"run_dir: '{shown}' {problem}; a run needs a folder of its own, "
                          f"e.g. run_dir=outputs/my-run")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: '{shown}' is a file, not a folder; choose another run_dir")
    anchor = _nearest_existing(run_dir)
    if not anchor.is_dir():
        raise ConfigError(f"run_dir: '{anchor}' (on the way to '{shown}') is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir: '{anchor}' is not writable (read-only file system or no permission); "
                          f"choose a run_dir you can write to")
    if resume is not None and resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"resume: checkpoint '{resume}' does not exist (use resume=auto to pick the newest)")
        if not is_complete(path):
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint (no COMPLETE marker)")
        return
    if not run_dir.is_dir():
        return
    if holds_run(run_dir) or (resume == "auto" and _resumable_legacy(run_dir)):
        if resume is None and not overwrite:
            raise ConfigError(f"run_dir: '{shown}' already holds a run; pass resume=auto to continue it, "
                              f"overwrite=true to replace it, or choose another run_dir")
        holder = None if locked_by_us else RunDirLock.holder(run_dir)
        if holder:
            raise ConfigError(f"run_dir: '{shown}' is in use by a live run ({holder}); wait for it or choose "
                              f"another run_dir")
        return
    foreign = _foreign_entries(run_dir)
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(f"run_dir: '{shown}' is not empty and is not an effitrain run (it holds {listed}); "
                          f"effitrain writes runs only into new, empty or its own folders, and overwrite=true "
                          f"never deletes files that are not a run's; choose another run_dir")


class RunDirLock:
    """Exclusive ownership of a run directory for one live run (held by rank 0)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: Optional[int] = None
        self._replaced: Optional[Path] = None   # the old run, moved aside by overwrite=true
        self._replaced_fd: Optional[int] = None

    # -------------------------------------------------------------------------------------------- holder
    @staticmethod
    def holder(run_dir: Path) -> Optional[str]:
        """Who holds the folder's lock right now, or None (a lock file left by a dead process is not held)."""
        path = run_dir / LOCK
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            try:
                info = json.loads(path.read_text() or "{}")
                return f"pid {info.get('pid')} on {info.get('host')}"
            except (OSError, ValueError):
                return "another process"
        finally:
            os.close(fd)
        return None

    @staticmethod
    def _take(run_dir: Path) -> int:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"run_dir: '{run_dir}' is in use by a live run "
                                  f"({RunDirLock.holder(run_dir) or 'another process'}); wait for it or choose "
                                  f"another run_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": platform.node(), "since": time.time()}).encode())
        return fd

    # -------------------------------------------------------------------------------------------- acquire
    def acquire(self, *, resume: Optional[str], overwrite: bool) -> None:
        """Take the folder (creating it, or moving an old run aside for ``overwrite=true``), then re-check under
        the lock what the pre-flight checked without it: another launch may have got there first."""
        run_dir = self.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"run_dir: cannot create '{run_dir}': {exc.strerror}") from None
        fd = self._take(run_dir)
        try:
            check_run_dir(run_dir, resume=resume, overwrite=overwrite, locked_by_us=True)
        except ConfigError:
            os.close(fd)
            raise
        if overwrite and resume is None and holds_run(run_dir):
            self._replaced = run_dir.with_name(f".{run_dir.name}{_REPLACED}{time.strftime('%Y%m%d-%H%M%S')}"
                                               f"-{os.getpid()}")
            run_dir.rename(self._replaced)       # the lock travels with the inode: still ours
            self._replaced_fd = fd
            run_dir.mkdir()
            fd = self._take(run_dir)
        self._fd = fd
        if not holds_run(run_dir):
            (run_dir / MARKER).write_text(json.dumps({"created": time.time(), "by": "effitrain"}) + "\n")

    # -------------------------------------------------------------------------------------------- outcome
    @property
    def replacing(self) -> bool:
        """An old run is still set aside, waiting for the new one to take its first step."""
        return self._replaced is not None

    def commit_replacement(self) -> None:
        """The new run has started: now the run it replaced may go."""
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None
        if self._replaced_fd is not None:
            os.close(self._replaced_fd)
            self._replaced_fd = None

    def abandon_replacement(self) -> None:
        """The new run failed before its first step: remove it and put the run it was replacing back."""
        if self._replaced is None:
            return
        failed = self.run_dir.with_name(f".{self.run_dir.name}.failed-{os.getpid()}")
        self.run_dir.rename(failed)
        self._replaced.rename(self.run_dir)
        shutil.rmtree(failed, ignore_errors=True)
        self._replaced = None

    def release(self) -> None:
        for attr in ("_fd", "_replaced_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)   # closing the descriptor drops the flock
                setattr(self, attr, None)


def resolve_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: the newest one that verifies (``resume=auto``), or the one named."""
    from effitrain.engine.checkpoint import CheckpointDamaged, newest_verified_checkpoint, verify_checkpoint

    if resume is None:
        return None
    if resume == "auto":
        return newest_verified_checkpoint(run_dir / CHECKPOINTS, report=_say)
    path = Path(resume)
    try:
        verify_checkpoint(path)
    except CheckpointDamaged as exc:
        raise ConfigError(f"resume: {exc}; resume=auto falls back to the newest intact checkpoint") from None
    return path


def _say(text: str) -> None:
    from effitrain.console import say

    say(text)


def _git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def write_run_record(run_dir: Path, *, cfg: dict[str, Any], argv: list[str], world_size: int,
                     resuming: bool, recipes: Optional[list[dict[str, Any]]] = None) -> None:
    """The resolved config, the recipes, the command line, package versions and git commit: enough to re-run it,
    and what ``effitrain resume`` reloads.

    A resumed run keeps the original ``config.yaml``, ``recipes.yaml`` and ``env.json`` and appends its command line,
    so the folder still says how the run was started; the resumed launch's own record goes to ``env.resume.json``.
    """
    import yaml

    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    record: dict[str, Any] = {"versions": versions, "python": sys.version.split()[0], "git_commit": _git_commit(),
                              "host": platform.node(), "world_size": world_size, "started": time.time(),
                              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    first = not (run_dir / "config.yaml").exists()
    if first or not resuming:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (run_dir / RECIPES_FILE).write_text(yaml.safe_dump(recipes or [], sort_keys=False))
    else:
        (run_dir / "config.resume.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(run_dir / "command.txt", "a") as fh:
        fh.write(" ".join(argv) + "\n")
    (run_dir / ("env.json" if first or not resuming else "env.resume.json")).write_text(json.dumps(record, indent=1))


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint, so metrics.jsonl reads as one run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
