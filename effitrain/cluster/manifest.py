"""The sweep manifest, ``SWEEP_ROOT/sweep.json``: one entry per member (its number, directory, overrides, exit
status and summary), written by the sweep's head when the members are submitted and again when they are done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from effitrain.errors import EXIT_CONFIG, EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE

MANIFEST = "sweep.json"
_STATUS = {EXIT_OK: "finished", EXIT_CONFIG: "refused", EXIT_DIVERGED: "diverged",
           EXIT_RESUMABLE: "stopped (checkpoint saved, not requeued)"}


def status_of(code: Optional[int]) -> str:
    """The word for a member's exit status: None = still queued or running."""
    if code is None:
        return "submitted"
    return _STATUS.get(code, "failed")


def member_entry(member: int, run_dir: Path, overrides: list[str], *, code: Optional[int] = None,
                 job_id: Optional[str] = None, message: Optional[str] = None) -> dict[str, Any]:
    summary = run_dir / "summary.json"
    entry: dict[str, Any] = {"member": member, "dir": str(run_dir), "overrides": list(overrides),
                             "status": status_of(code), "exit_code": code,
                             "summary": str(summary) if summary.is_file() else None}
    if job_id:
        entry["job_id"] = job_id
    if message:
        entry["message"] = " ".join(message.split())
    return entry


_WRITTEN: list[Path] = []  # the sweep roots this process wrote a manifest into (the head points the user there)


def written_roots(forget: bool = False) -> list[Path]:
    roots = list(_WRITTEN)
    if forget:
        _WRITTEN.clear()
    return roots


def write_manifest(root: Path, entries: list[dict[str, Any]]) -> Path:
    """Atomically (a reader never sees half a file)."""
    if root not in _WRITTEN:
        _WRITTEN.append(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"members": sorted(entries, key=lambda e: e["member"])}, indent=1))
    tmp.replace(path)
    return path


def member_label(recipes: list[str], overrides: list[str]) -> str:
    """A sweep member in words, for a tracker's run name: ``galore optimizer.lr=1e-3``."""
    rest = [o for o in overrides if not o.lstrip("+").startswith(("recipe=", "run_dir="))]
    return " ".join(["+".join(recipes) or "default", *rest])[:128]


def fill_sweep_logger(cfg: dict[str, Any], sweep_root: Path, recipes: list[str], overrides: list[str]) -> None:
    """A sweep member's tracker settings, where the user left them unset: the sweep's group, the member's name."""
    logger = cfg.get("logger") or {}
    if logger.get("name") != "wandb":
        return
    if logger.get("group") is None:
        logger["group"] = sweep_root.name
    if logger.get("run_name") is None:
        logger["run_name"] = member_label(recipes, overrides)
