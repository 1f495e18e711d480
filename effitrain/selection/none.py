"""The ``none`` selection: train on the whole pool."""

from __future__ import annotations

from typing import Any

from effitrain.selection.base import Selection


def build_none(params: Any, pool: Any, *, cache_dir: Any = None, seed: int = 0) -> Selection:
    """Return the pool's train split unchanged; no manifest is written (there is nothing to record)."""
    from effitrain.selection.pipeline import _domain_counts

    train = pool["train"]
    return Selection(train=train, manifest_path=None,
                     info={"method": "none", "pool_examples": len(train), "kept_examples": len(train),
                           "kept_token_fraction": 1.0, "kept_domains": _domain_counts(train),
                           "cache_hit": False, "seconds": 0.0})
