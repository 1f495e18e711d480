"""Dedup scorer: exact duplicates (hash of the lower-cased, whitespace-collapsed text) and near duplicates
(MinHash over word or character n-gram shingles, banded LSH from ``datasketch``).  The first document of every
duplicate group is kept; the rest get ``keep = False`` and never reach the selector.

Needs: nothing.  Cost: one batched pass computing signatures (``num_perm`` 64-bit values per document, parallel
with ``num_proc``), then one sequential pass querying/inserting into an in-memory LSH index (memory about
``num_perm x 8`` bytes per kept document).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.scorers._util import batched_map

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def shingles(text: str, unit: str, n: int) -> list[bytes]:
    norm = normalize(text)
    if unit == "word":
        toks = _WORD.findall(norm)
        grams = [" ".join(toks[i:i + n]) for i in range(max(1, len(toks) - n + 1))] if toks else [""]
    else:
        grams = [norm[i:i + n] for i in range(max(1, len(norm) - n + 1))]
    return [g.encode("utf-8") for g in set(grams)]


def _scheme() -> dict:
    """datasketch >= 2 needs the hashing scheme named when a MinHash is rebuilt from stored values."""
    import inspect

    from datasketch import MinHash
    return {"scheme": "affine32"} if "scheme" in inspect.signature(MinHash.__init__).parameters else {}


def _signatures(batch, num_perm, unit, n, near):
    from datasketch import MinHash

    out = {"exact": [hashlib.sha1(normalize(t).encode("utf-8")).hexdigest() for t in batch["text"]]}
    if near:
        sets = [shingles(t, unit, n) for t in batch["text"]]
        mhs = MinHash.bulk(sets, num_perm=num_perm, seed=1, **_scheme())
        out["minhash"] = [m.hashvalues.astype(np.uint64) for m in mhs]
    return out


class DedupScorer:
    def __init__(self, params) -> None:
        self.params = params

    def score(self, candidates, ctx) -> Scores:
        from datasketch import MinHash, MinHashLSH

        p = self.params
        kw = {"num_perm": p.num_perm, "unit": p.shingle, "n": p.shingle_size, "near": p.near}
        sigs = batched_map(candidates.select_columns(["text"]), _signatures, tag="dedup", payload=kw, ctx=ctx,
                           fn_kwargs=kw)
        keep = np.ones(len(candidates), dtype=bool)
        seen: set[str] = set()
        lsh = MinHashLSH(threshold=p.threshold, num_perm=p.num_perm) if p.near else None
        exact_dups = near_dups = 0
        scheme = _scheme()
        i = 0
        cols = ["exact", "minhash"] if p.near else ["exact"]
        for batch in sigs.select_columns(cols).iter(batch_size=4096):
            for j, h in enumerate(batch["exact"]):
                if p.exact and h in seen:
                    keep[i] = False
                    exact_dups += 1
                else:
                    seen.add(h)
                    if lsh is not None:
                        m = MinHash(num_perm=p.num_perm, seed=1, **scheme,
                                    hashvalues=np.asarray(batch["minhash"][j], dtype=np.uint64))
                        if lsh.query(m):
                            keep[i] = False
                            near_dups += 1
                        else:
                            lsh.insert(str(i), m, check_duplication=False)
                i += 1
        return Scores(scores=keep.astype(np.float64), keep=keep,
                      info={"exact_duplicates": exact_dups, "near_duplicates": near_dups})
