"""The layout of packed rows, the lowest file of the data package: token ids alone ``[N, S]``, or rows with channels
(:data:`CHANNELS`: ``input_ids``, ``labels`` with :data:`IGNORE_INDEX` where no loss is taken, ``position_ids``)
stored as one fixed-length column each, and preference pairs, whose rejected row's channels are prefixed
``rejected_``.  Every format writes rows this way and the loop reads them back with
:func:`effitrain.data.packing.to_numpy`."""

from __future__ import annotations

from typing import Optional

import numpy as np

IGNORE_INDEX = -100  # transformers' label for "no loss at this position"
CHANNELS = ("input_ids", "labels", "position_ids")
REJECTED_CHANNELS = tuple(f"rejected_{c}" for c in CHANNELS)


def column_numpy(packed, name: str) -> np.ndarray:
    """One fixed-length integer column as a ``(rows, length)`` array."""
    column = packed.with_format("arrow")[:].column(name)
    seq_len = column.type.list_size
    chunks = column.chunks
    if len(chunks) == 1 and chunks[0].offset == 0:
        values = chunks[0].values
        try:
            flat = values.to_numpy(zero_copy_only=True)
        except Exception:  # nulls or an unexpected layout: fall back to a copy
            flat = values.to_numpy(zero_copy_only=False)
        flat = flat[: len(chunks[0]) * seq_len]
    else:
        flat = column.combine_chunks().flatten().to_numpy()
    return flat.reshape(-1, seq_len)


def stacked_rows(packed) -> Optional[np.ndarray]:
    """The channels of chat rows stacked: ``[N, 3, S]`` or, for pairs, ``[N, 2, 3, S]``; None for text rows."""
    names = packed.column_names
    if "labels" not in names:
        return None
    rows = np.stack([column_numpy(packed, c) for c in CHANNELS], axis=1)
    if REJECTED_CHANNELS[0] in names:
        rejected = np.stack([column_numpy(packed, c) for c in REJECTED_CHANNELS], axis=1)
        rows = np.stack([rows, rejected], axis=1)
    return rows
