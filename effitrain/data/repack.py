"""Packing documents in an order a method chooses, with a per-token loss mask, cached as numpy arrays.

The standard packing (:mod:`effitrain.data.packing`) concatenates each domain's documents in source order.  Some
curricula need other rows from the same documents: MeCo prepends metadata to every document (and masks the loss on
it), in-context pre-training concatenates chains of related documents across domains.  Such a curriculum builds its
rows here and hands them to the loop as the sampler's ``train_rows`` (``effitrain/train.py``): the loop gathers
``train_rows[indices]`` exactly as it gathers the standard rows.

* :func:`tokenize_documents` -- each document's token ids followed by the end-of-text token, as packing does;
* :func:`pack_stream` -- concatenate documents in a given order, cut rows of exactly ``seq_len`` tokens (the
  incomplete tail is dropped, as in packing), with the loss mask and the document each row starts in;
* :func:`cached_arrays` -- build a dict of arrays once per content key under ``<cache>/<kind>/<key>`` and
  memory-map it afterwards (every rank, every later run);
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np


def tokenize_documents(texts: Sequence[str], tokenizer: Any, *, batch_size: int = 1000) -> list[np.ndarray]:
    """The token ids of every text followed by the end-of-text token (``add_special_tokens=False``, as packing)."""
    eos = tokenizer.eos_token_id
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False,
                            return_attention_mask=False)["input_ids"]
        out.extend(np.asarray(ids + [eos], dtype=np.int32) for ids in encoded)
    return out


def pack_stream(docs: Sequence[np.ndarray], seq_len: int, *,
                masks: Optional[Sequence[np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Concatenate ``docs`` in the given order and cut the stream into rows of ``seq_len`` tokens.

    Returns ``rows`` (int32 ``[n, seq_len]``), ``mask`` (bool ``[n, seq_len]``: True where the token is a training
    target; all True without ``masks``) and ``first_doc`` (int64 ``[n]``: the index in ``docs`` of the document
    the row's first token belongs to).  The incomplete last row is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    total = int(lengths.sum())
    n = total // seq_len
    stream = np.concatenate(docs).astype(np.int32, copy=False) if len(docs) else np.zeros(0, np.int32)
    if masks is None:
        mask = np.ones(total, dtype=bool)
    else:
        mask = np.concatenate([np.asarray(m, dtype=bool) for m in masks]) if len(masks) else np.zeros(0, bool)
        if len(mask) != total:
            raise ValueError("every mask must have its document's length")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else np.zeros(0, np.int64)
    # the document that holds token position p is the last one whose start is <= p
    first_doc = np.searchsorted(starts, np.arange(n, dtype=np.int64) * seq_len, side="right") - 1
    return {"rows": stream[: n * seq_len].reshape(n, seq_len), "mask": mask[: n * seq_len].reshape(n, seq_len),
            "first_doc": first_doc.astype(np.int64)}


def cached_arrays(kind: str, key: str, build: Callable[[], dict[str, np.ndarray]], *,
                  cache_root: Optional[str | Path] = None) -> dict[str, np.ndarray]:
    """``build()``'s arrays, computed once under ``<cache>/<kind>/<key>`` (atomic, locked) and memory-mapped."""
    from effitrain.data.cache import build_once

    def write(folder: Path) -> None:
        for name, array in build().items():
            np.save(folder / f"{name}.npy", np.asarray(array), allow_pickle=False)

    folder = build_once(kind, key, write, cache_root=cache_root)
    return {p.stem: _load(p) for p in sorted(folder.glob("*.npy"))}


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # an array with no element cannot be memory-mapped
        return np.load(path, allow_pickle=False)
