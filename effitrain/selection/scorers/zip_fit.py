"""ZIP-FIT scorer (Obbad et al. 2024, arXiv 2410.18194): alignment with the target by compression.

Normalized compression distance ``NCD(x, t) = (C(x t) - min(C(x), C(t))) / max(C(x), C(t))`` with ``C`` the
gzip-compressed length (``gzip.compress`` at ``level``, as the authors' ``ZIPFIT.compress`` with
``compression_algorithm='gzip'``) and ``x t`` the plain concatenation (no separator, as theirs); the score is
``1 - mean_t NCD(x, t)`` over up to ``max_target`` target examples, so higher = more target-like.  Texts are cut at
``max_chars`` characters (our addition: it bounds the cost on long documents).

Needs: a target set.  Cost: N x (T + 1) compressions of up to 2 x max_chars characters; CPU only, parallel with
``num_proc`` (about 2-5k compressions per second per core for 1 kB texts).
"""

from __future__ import annotations

import gzip
import hashlib

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.scorers._util import batched_map


def _clen(b: bytes, level: int) -> int:
    return len(gzip.compress(b, compresslevel=level, mtime=0))


def ncd_scores(texts, targets: list[bytes], target_lens: list[int], max_chars: int, level: int) -> list[float]:
    out = []
    for text in texts:
        x = text[:max_chars].encode("utf-8")
        cx = _clen(x, level)
        total = 0.0
        for t, ct in zip(targets, target_lens):
            cxt = _clen(x + t, level)
            total += (cxt - min(cx, ct)) / max(cx, ct, 1)
        out.append(1.0 - total / len(targets))
    return out


def _score_batch(batch, targets, target_lens, max_chars, level):
    return {"zip_fit": ncd_scores(batch["text"], targets, target_lens, max_chars, level)}


class ZipFitScorer:
    def __init__(self, params) -> None:
        self.params = params

    def score(self, candidates, ctx) -> Scores:
        p = self.params
        texts = ctx.target.select(range(min(p.max_target, len(ctx.target))))["text"]
        targets = [t[:p.max_chars].encode("utf-8") for t in texts]
        lens = [_clen(t, p.level) for t in targets]
        kw = {"targets": targets, "target_lens": lens, "max_chars": p.max_chars, "level": p.level}
        scored = batched_map(candidates.select_columns(["text"]), _score_batch, tag="zip_fit-gzip",
                             payload={"t": hashlib.sha256(b"\0".join(targets)).hexdigest(),
                                      "max_chars": p.max_chars, "level": p.level}, ctx=ctx, fn_kwargs=kw)
        from effitrain.selection.base import column_numpy
        return Scores(scores=column_numpy(scored, "zip_fit", np.float64), info={"target_used": len(targets)})
