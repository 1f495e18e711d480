"""MinHash dedup on the sharded data engine (issue 24, ``data.executor``): map then reduce -- exactly the documents
the in-memory :class:`~effitrain.selection.scorers.dedup.DedupScorer` and its ``random`` selector keep.

Today's semantics, which this reproduces: documents are visited in pool order; one whose normalized text hashes
(SHA-1) like an earlier document's is an exact duplicate (with ``exact``) and is neither queried nor inserted; any
other is queried against datasketch's ``MinHashLSH`` (``threshold`` -> its own ``b`` bands of ``r`` rows) holding
the documents kept so far, dropped when it shares a band with one of them, else kept and inserted.  So the first
document of a group is the one kept, and a document is measured only against kept ones (a chain a~b~c with b dropped
keeps c unless c shares a band with a).

1. **signatures** (datatrove tasks, :class:`~effitrain.selection.sharded_pool.PoolCounts` with ``dedup``): per file,
   every train document's exact hash and MinHash signature -- the in-memory scorer's own ``_signatures`` (same
   shingles, same ``num_perm``, same seed and hashing scheme) -- and its budget weight.
2. **buckets** (reduce): per band, the candidates' band values (``r`` of the signature's values; two band keys of
   datasketch are equal exactly when these are) are numbered (:func:`bucket_numbers`: sorted by a 64-bit mix, rows
   of one mix compared), so every bucket is an integer; a candidate whose buckets all hold it alone is kept without
   more work.
3. **clusters** (reduce): the others are visited in pool order with one "holds a kept document" flag per bucket --
   datasketch's query-then-insert, on integers.  Then the ``random`` selector's permutation of the kept documents,
   cut at the budget (all of them at the default ``fraction: 1.0``).

datatrove's MinHash stages (0.10.1, ``pipeline/dedup/minhash.py``) are not used: they shingle their own simplified
text (punctuation removed) with their own hashes and bands, and join every matching pair into transitive union-find
clusters keeping each cluster's root (the member of the larger set at each union) -- not query-against-kept -- so
they would keep other documents than ``dedup`` does today.  The reduce holds per candidate its pool columns (about
40 bytes), one bucket number per band (4 bytes each) and one band's values while it is numbered (``r`` x 4 bytes);
the signatures stay on disk, each file mapped only while a band is read from it
(``scripts/bench_dedup_reduce.py``: 317 MB peak at 1M candidates, 143 MB of it before the reduce).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from effitrain.data.engine import finish_stage, run_stage
from effitrain.selection.selectors import take_until
from effitrain.selection.sharded_pool import (PoolCounts, candidate_column, candidate_pairs, load_pool,
                                              require_whole_pool_selector)

_VERSION = 1


class ShardedDedup:
    """The ``selection`` hook of :func:`effitrain.data.sharded.build_sharded_splits` for ``selection=dedup``."""

    def __init__(self, params: Any, seed: int) -> None:
        self.params, self.seed, self.info = params, seed, None

    def key_parts(self) -> tuple:
        from effitrain.selection.pipeline import params_dict

        return ("dedup", _VERSION, json.dumps(params_dict(self.params), sort_keys=True), self.seed)

    def __call__(self, out: Path, corpus: Any, eval_docs: Path, data_params: Any, work: Path) -> None:
        p = self.params
        sp = p.scorer_block.params
        require_whole_pool_selector(p, "dedup", "random")
        start = time.perf_counter()
        spec = {"num_perm": sp.num_perm, "shingle": sp.shingle, "shingle_size": sp.shingle_size, "near": sp.near}
        run_stage(data_params, [corpus.reader(), PoolCounts(str(work), eval_docs=str(eval_docs), dedup=spec)],
                  work, job_name="dedup-signatures")
        pool = load_pool(work, len(corpus.files), p.target, corpus, self.seed)
        n = pool.candidates
        keep, exact_dup = self.representatives(work, pool)
        near_dups = int((~exact_dup).sum() - keep.sum())
        weights = candidate_column(pool, "weight", np.float64) if p.budget.unit == "tokens" else np.ones(n)
        budget = p.budget.fraction * float(weights.sum())
        allowed = np.flatnonzero(keep)
        chosen = allowed[take_until(np.random.default_rng(self.seed).permutation(len(allowed)), weights[allowed],
                                    budget)]
        chosen.sort()
        np.save(out / "selected.npy", candidate_pairs(pool, chosen))
        kept_units, total = float(weights[chosen].sum()), float(weights.sum())
        (out / "info.json").write_text(json.dumps({
            "method": "dedup", "scorer": "minhash_dedup", "selector": "random", "pool_examples": n,
            "target_examples": len(pool.target_texts), "after_filter_examples": int(len(allowed)),
            "kept_examples": int(len(chosen)), "budget": {"fraction": p.budget.fraction, "unit": p.budget.unit},
            "pool_budget_units": total, "kept_budget_units": kept_units,
            **({"kept_token_fraction": round(kept_units / max(1.0, total), 4)} if p.budget.unit == "tokens" else {}),
            "scorer_exact_duplicates": int(exact_dup.sum()), "scorer_near_duplicates": near_dups,
            "seconds": round(time.perf_counter() - start, 3)}) + "\n")
        finish_stage(work)

    def representatives(self, work: Path, pool: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(kept, exact duplicate)`` masks over the candidates: the reduce of the signatures stage's files."""
        sp = self.params.scorer_block.params
        n = pool.candidates
        exact_dup = np.zeros(n, dtype=bool)
        if sp.exact:
            _, first, inverse = np.unique(candidate_column(pool, "exact", "S20"), return_index=True,
                                          return_inverse=True)
            exact_dup = first[inverse.reshape(-1)] != np.arange(n)
            del first, inverse
        keep = ~exact_dup
        if sp.near:
            keep = self._near(work, pool, keep, sp)
        return keep, exact_dup

    def _near(self, work: Path, pool: Any, keep: np.ndarray, sp: Any) -> np.ndarray:
        """``keep`` after datasketch's query-against-kept over the candidates that are no exact duplicate."""
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=sp.threshold, num_perm=sp.num_perm)  # its bands: (start, end) of each
        visit = np.flatnonzero(keep)
        signatures = [work / "sig" / f"{f:06d}.npy" for f, _ in pool.files]
        rows = []  # per file: which of its rows are visited (a candidate, no exact duplicate)
        for f, a in pool.files:
            mine = np.zeros(len(a["record"]), dtype=bool)
            n_candidates = int(pool.candidate[f].sum())
            mine[np.flatnonzero(pool.candidate[f])] = keep[pool.offset[f]:pool.offset[f] + n_candidates]
            rows.append(mine)
        dtype = np.result_type(*[np.load(path, mmap_mode="r").dtype for path in signatures]) if signatures else \
            np.uint32
        buckets, shared = [], np.zeros(len(visit), dtype=bool)
        for lo, hi in lsh.hashranges:  # one band at a time: its values (r of the signature), numbered
            values, at = np.empty((len(visit), hi - lo), dtype=dtype), 0  # filled from the memory maps: one copy
            for path, mine in zip(signatures, rows):
                # a band is a few values of every row, so reading it touches every page of the file: map one file
                # at a time and unmap it, or the touched pages of all the signatures count in this process's RSS
                sig = np.load(path, mmap_mode="r")
                block = sig[:, lo:hi][mine]
                del sig
                values[at:at + len(block)] = block
                at += len(block)
            ids, counts = bucket_numbers(values)
            del values
            ids = ids.astype(np.int32 if len(counts) < 2 ** 31 else np.int64)
            buckets.append(ids)
            shared |= counts[ids] > 1
            del counts
        keep = keep.copy()
        holds_kept = [np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=bool) for ids in buckets]
        for j in np.flatnonzero(shared):  # pool order; a candidate alone in all its buckets stays kept
            mine = [int(ids[j]) for ids in buckets]
            if any(h[b] for h, b in zip(holds_kept, mine)):
                keep[visit[j]] = False
            else:
                for h, b in zip(holds_kept, mine):
                    h[b] = True
        return keep


def bucket_numbers(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(each row's bucket number, rows per bucket)``: two rows get one number exactly when all their values are
    equal.  The rows are numbered by a 64-bit mix of their values (8 bytes a row to sort, not the row), and the rows
    that share a mix are compared: on a collision -- about n^2 / 2^65, never seen -- the rows themselves are
    numbered, so the numbers are exact either way."""
    n = len(values)
    mix = _mix(values)
    order = np.argsort(mix, kind="stable")
    ordered = mix[order]
    del mix
    same = ordered[1:] == ordered[:-1]
    del ordered
    pairs = np.flatnonzero(same)
    if len(pairs) and (values[order[pairs]] != values[order[pairs + 1]]).any():  # a collision: the exact way
        keys = np.ascontiguousarray(values).view(np.dtype((np.void, values.itemsize * values.shape[1]))).reshape(-1)
        _, ids, counts = np.unique(keys, return_inverse=True, return_counts=True)
        return ids.reshape(-1), counts
    first = np.r_[True, ~same] if n else np.zeros(0, dtype=bool)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.cumsum(first) - 1
    counts = np.diff(np.r_[np.flatnonzero(first), n])
    return ids, counts


def _mix(values: np.ndarray) -> np.ndarray:
    """A 64-bit FNV-1a-style mix of each row's values (a shift folded in after each multiply)."""
    mix = np.full(len(values), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in range(values.shape[1]):
            mix ^= values[:, c].astype(np.uint64)
            mix *= np.uint64(0x100000001B3)
            mix ^= mix >> np.uint64(29)
    return mix
