"""Every row of a corpus ordered by a score, with the memory of a budget instead of the corpus (an external sort).

The order is the in-memory one (:func:`effitrain.curriculum.row_scores.rank_difficulty`): rows by ascending score,
ties by a seeded random key, rows of equal score and key by their index.  Here the scores arrive in blocks of
consecutive rows (e.g. read from memory-mapped token shards); they are cut into runs that fit the budget, each run
is sorted in memory and written to disk, and the runs are merged k ways (``heapq.merge``) reading each run through
a memory map a small block at a time.  The result is an ``int64`` ``.npy`` of row indices, opened memory-mapped.

The tie-break key of row ``i`` is a hash of ``(seed, i)`` (:func:`tiebreak_keys`), not a position in a seeded
permutation of all rows: a permutation needs every row in memory at once, a hash only the rows at hand, and it is
as random an order for the ties.

Scores are compared as 64-bit keys that keep the float order (:func:`score_keys`): NaN last and ``-0.0 == 0.0``, as
``numpy.lexsort`` sorts floats, so the merge compares integers and the two paths agree on every input.
"""

from __future__ import annotations

import heapq
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

#: What one process may hold for an order's sorted runs (and the merge's read buffers): the default budget.
ORDER_BUDGET_BYTES = 256 << 20

_RUN = np.dtype([("key", "<u8"), ("tie", "<u8"), ("row", "<i8")])
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def tiebreak_keys(seed: int, start: int, stop: int) -> np.ndarray:
    """The tie-break keys of rows ``start .. stop - 1``: splitmix64 of the row index offset by a key of ``seed``
    (a bijection of 64-bit integers: distinct rows get distinct keys)."""
    with np.errstate(over="ignore"):
        base = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
        z = (np.arange(start, stop, dtype=np.uint64) + base) & _MASK
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Unsigned 64-bit keys in the order numpy sorts the float scores: -inf ... -0.0 = 0.0 ... inf, NaN."""
    s = np.asarray(scores, dtype=np.float64) + 0.0  # -0.0 + 0.0 is 0.0: the two zeros get one key
    s = np.where(np.isnan(s), np.float64(np.nan), s)  # one NaN (positive): every NaN sorts last, as in lexsort
    bits = s.view(np.uint64)
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def _sorted_run(scores: np.ndarray, start: int, seed: int) -> np.ndarray:
    run = np.empty(len(scores), dtype=_RUN)
    run["key"] = score_keys(scores)
    run["tie"] = tiebreak_keys(seed, start, start + len(scores))
    run["row"] = np.arange(start, start + len(scores), dtype=np.int64)
    return run[np.lexsort((run["tie"], run["key"]))]  # stable: equal (key, tie) stay in row order


def _runs_of(blocks: Iterable[np.ndarray], run_rows: int) -> Iterator[np.ndarray]:
    """The scores regrouped into runs of ``run_rows`` consecutive rows (the last one shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        while len(block):
            take = min(run_rows - held, len(block))
            pending.append(block[:take])
            held += take
            block = block[take:]
            if held == run_rows:
                yield np.concatenate(pending)
                pending, held = [], 0
    if held:
        yield np.concatenate(pending)


def _read(path: Path, block_rows: int) -> Iterator[tuple[int, int, int]]:
    run = np.load(path, mmap_mode="r")
    for start in range(0, len(run), block_rows):
        yield from np.asarray(run[start:start + block_rows]).tolist()  # (key, tie, row) tuples
    del run


def sorted_order(blocks: Iterable[np.ndarray], n_rows: int, seed: int, out: Path, *,
                 budget_bytes: int = ORDER_BUDGET_BYTES) -> np.ndarray:
    """Write ``out`` (``.npy``, int64): the rows ``0 .. n_rows - 1`` by ascending score (``blocks``: the scores of
    consecutive rows, in row order), ties as described above; returns it memory-mapped.  At most about
    ``budget_bytes`` of rows are in memory at once: a run while it is sorted, then the merge's read blocks."""
    out = Path(out)
    if n_rows == 0:  # (a memory map cannot be empty)
        np.save(out, np.zeros(0, dtype=np.int64))
        return np.load(out)
    # a run of R rows holds its 24-byte entries, the sort's permutation and the sorted copy: ~56 R bytes
    run_rows = max(1, budget_bytes // 56)
    work = out.with_name(f".{out.name}.runs{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        paths, start = [], 0
        for scores in _runs_of(blocks, run_rows):
            path = work / f"{len(paths):06d}.npy"
            np.save(path, _sorted_run(scores, start, seed))
            paths.append(path)
            start += len(scores)
        if start != n_rows:
            raise ValueError(f"sorted_order: the blocks held {start} scores for {n_rows} rows")
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npy")
        order = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n_rows,))
        # each run is read a block at a time; the blocks of all runs and the write buffer share the budget
        block_rows = max(1, run_rows // (len(paths) + 1))
        buffer: list[int] = []
        written = 0
        for _, _, row in heapq.merge(*(_read(p, block_rows) for p in paths)):
            buffer.append(row)
            if len(buffer) == block_rows:
                order[written:written + len(buffer)] = buffer
                written += len(buffer)
                buffer = []
        order[written:written + len(buffer)] = buffer
        order.flush()
        del order
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return np.load(out, mmap_mode="r")
