"""Where effitrain keeps caches (demo corpus, trained tokenizers, selection manifests)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$EFFITRAIN_CACHE`` (default ``~/.cache/effitrain``) joined with ``parts``, created on first use."""
    root = Path(os.environ.get("EFFITRAIN_CACHE") or Path.home() / ".cache" / "effitrain")
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # EFFITRAIN_CACHE names a file, a read-only place, ...
        from effitrain.registry import ConfigError

        raise ConfigError(f"EFFITRAIN_CACHE: cannot use '{root}' as the cache folder ({exc.strerror or exc}: "
                          f"'{exc.filename or path}'); point EFFITRAIN_CACHE at a writable folder") from None
    return path


def check_cache_root() -> None:
    """Refuse a cache root that exists but is not a folder, without creating anything (for ``effitrain check``)."""
    root = Path(os.environ.get("EFFITRAIN_CACHE") or Path.home() / ".cache" / "effitrain")
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                from effitrain.registry import ConfigError

                raise ConfigError(f"EFFITRAIN_CACHE: '{p}' is a file, so '{root}' cannot be the cache folder; "
                                  f"point EFFITRAIN_CACHE at a folder")
            return
