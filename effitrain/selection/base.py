"""What a selection returns, what a scorer hands to a selector, and the token count the budget is measured in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

# Pre-tokenizer word pieces: runs of word characters, or one other non-space character.  The budget counts these,
# not BPE tokens, because the model's tokenizer is trained on the selection's output (after this stage).
_PIECE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


def add_token_counts(batch: dict) -> dict:
    """``datasets.map`` function (batched): the ``n_tokens`` column the budget is measured in."""
    return {"n_tokens": [count_tokens(t) for t in batch["text"]]}


@dataclass
class Selection:
    """The selected training split and where its manifest lies (``None`` for the ``none`` selection).

    ``info`` holds method, pool/kept examples and tokens, seconds, examples/s, cache_hit and the manifest key: the
    engine copies it into the run's summary.
    """
    train: Any                       # datasets.Dataset, columns id/text/domain
    manifest_path: Optional[str]
    info: dict = field(default_factory=dict)


@dataclass
class Scores:
    """A scorer's output over the N candidates, in candidate order.

    ``scores``: higher = more wanted for the default selectors (a selector may invert it); ``clusters``: integer
    labels for the cluster-balanced selector; ``groups``: integer labels of a coarser level (S2L's data sources: the
    pool's domains) that a selector may balance first; ``keep``: a hard filter applied before any selector (dedup,
    DSIR's minimum length).
    """
    scores: np.ndarray
    clusters: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None
    keep: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a scorer may use besides the candidates: the target texts, the seed, batching, a cache folder (the
    selection cache: a pool proxy is kept there) and a content hash of the candidates (the key of that proxy)."""
    target: Optional[Any]            # datasets.Dataset with a `text` column (and `task` when given), or None
    seed: int
    num_proc: int = 1
    batch_size: int = 512
    work_dir: Optional[str] = None
    candidates_hash: Optional[str] = None


def column_numpy(ds: Any, name: str, dtype: Any = None, batch_size: int = 65536) -> np.ndarray:
    """One column as a numpy array, read in Arrow batches (a list column gives a 2-D array)."""
    parts = []
    for batch in ds.select_columns([name]).with_format("arrow").iter(batch_size=batch_size):
        col = batch.column(name).combine_chunks() if hasattr(batch.column(name), "combine_chunks") \
            else batch.column(name)
        import pyarrow as pa
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            width = len(col[0]) if len(col) else 0
            parts.append(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width))
        else:
            parts.append(np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)
