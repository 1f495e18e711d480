"""The names in a run directory and which of its checkpoints are complete: the on-disk layout that the engine
writes and that the tools read before anything is built (``effitrain resume``'s checks, export, the cluster's
requeue).  Torch-free, standard library only; the ground both sides stand on, so neither reaches into the other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

CHECKPOINTS = "checkpoints"     # RUN_DIR/checkpoints/step_XXXXXXXX/
COMPLETE = "COMPLETE"           # the marker of a checkpoint folder whose files were all written (the last file)
META = "meta.json"              # a checkpoint's file sizes and checksums, and the launch layout that wrote it
RECIPES_FILE = "recipes.yaml"   # the recipes a run was composed from, beside its config.yaml
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None
