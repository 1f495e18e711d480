"""Where effitrain keeps caches (demo corpus, trained tokenizers, selection manifests)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$EFFITRAIN_CACHE`` (default ``~/.cache/effitrain``) joined with ``parts``, created on first use."""
    root = Path(os.environ.get("EFFITRAIN_CACHE") or Path.home() / ".cache" / "effitrain")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
