"""The run directory: refusing to clobber an existing run, recording how the run was made, finding checkpoints."""

from __future__ import annotations

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

from effitrain.engine.checkpoint import is_complete, latest_checkpoint
from effitrain.registry import ConfigError

CHECKPOINTS = "checkpoints"
# Files that only a run writes: a folder holding one of them is a run that must not be silently replaced.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINTS)
_PACKAGES = ("effitrain", "torch", "deepspeed", "transformers", "datasets", "tokenizers", "peft", "hydra-core",
             "omegaconf", "numpy", "bitsandbytes", "pytorch-optimizer", "scikit-learn", "datasketch")


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS)


def check_run_dir(run_dir: Path, *, resume: Optional[str], overwrite: bool) -> None:
    """Pre-flight, before anything is written: refuse to reuse a run directory unless asked to."""
    if resume is not None and resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"resume: checkpoint '{resume}' does not exist (use resume=auto to pick the newest)")
        if not is_complete(path):
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint (no COMPLETE marker)")
        return
    if resume == "auto" or not holds_run(run_dir):
        return
    if not overwrite:
        raise ConfigError(f"run_dir: '{run_dir}' already holds a run; pass resume=auto to continue it, "
                          f"overwrite=true to replace it, or choose another run_dir")


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume: Optional[str]) -> None:
    """On rank 0, after validation: clear the folder if the user asked to overwrite, then create it."""
    if overwrite and resume is None and holds_run(run_dir):
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def resolve_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir / CHECKPOINTS)
    return Path(resume)


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
                     resuming: bool) -> None:
    """The resolved config, the command line, package versions and git commit: enough to re-run it.

    A resumed run keeps the original ``config.yaml`` and ``env.json`` and appends its command line, so the folder
    still says how the run was started; the resumed launch's own record goes to ``env.resume.json``.
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
