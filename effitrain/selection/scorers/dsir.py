"""DSIR scorer (Xie et al. 2023, arXiv 2302.03169): importance weights in a hashed n-gram feature space.

Each text becomes a bag of hashed unigrams and bigrams (``num_buckets`` buckets, crc32 of the lower-cased words).
Two bag-of-buckets distributions are fitted with add-alpha smoothing: one on the target examples, one on the whole
candidate pool.  With a small target (tens of documents) most n-grams of any pool document were never seen in the
target, and an add-alpha estimate then punishes long documents for their length alone; ``pool_mix`` (default 0.1)
mixes that share of the pool distribution into the target's, which bounds each unseen n-gram's penalty to
``log(pool_mix)`` (``pool_mix: 0`` is the paper's estimate, fine for targets of thousands of documents).  The score of an example is its log importance weight
``sum_j log p_target(b_j) - log p_pool(b_j)`` over its features; the ``gumbel_topk`` selector then resamples without
replacement proportional to ``exp(score)``.

Needs: a target set.  Cost: two passes over the pool, O(tokens); features are stored as a list column of bucket ids
(about 8 bytes per word in the Arrow cache), memory O(num_buckets).  CPU only, parallel with ``num_proc``.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.scorers._util import batched_map

_WORD = re.compile(r"\w+")


def hashed_ngrams(text: str, num_buckets: int, ngram: int, lowercase: bool) -> list[int]:
    words = _WORD.findall(text.lower() if lowercase else text)
    grams = list(words)
    for n in range(2, ngram + 1):
        grams += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return [zlib.crc32(g.encode("utf-8")) % num_buckets for g in grams]


def _featurize(batch, num_buckets, ngram, lowercase):
    return {"dsir_buckets": [hashed_ngrams(t, num_buckets, ngram, lowercase) for t in batch["text"]]}


def _iter_lists(ds, column):
    """(flat values, offsets) of a list column, batch by batch."""
    for batch in ds.with_format("arrow").iter(batch_size=65536):
        col = batch.column(column).combine_chunks() if hasattr(batch.column(column), "combine_chunks") \
            else batch.column(column)
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        offsets = offsets - offsets[0]
        yield values, offsets


class DSIRScorer:
    def __init__(self, params) -> None:
        self.params = params

    def _features(self, ds, ctx, tag):
        p = self.params
        kw = {"num_buckets": p.num_buckets, "ngram": p.ngram, "lowercase": p.lowercase}
        return batched_map(ds.select_columns(["text"]), _featurize, tag=f"dsir-{tag}", payload=kw, ctx=ctx,
                           fn_kwargs=kw)

    def _counts(self, feats) -> np.ndarray:
        counts = np.zeros(self.params.num_buckets, dtype=np.float64)
        for values, _ in _iter_lists(feats, "dsir_buckets"):
            counts += np.bincount(values, minlength=self.params.num_buckets)
        return counts

    def score(self, candidates, ctx) -> Scores:
        p = self.params
        pool_feats = self._features(candidates, ctx, "pool")
        target_feats = self._features(ctx.target, ctx, "target")
        raw = self._counts(pool_feats) + p.smoothing
        tgt = self._counts(target_feats) + p.smoothing
        p_raw = raw / raw.sum()
        p_tgt = (1.0 - p.pool_mix) * (tgt / tgt.sum()) + p.pool_mix * p_raw
        log_ratio = np.log(p_tgt) - np.log(p_raw)
        out = []
        for values, offsets in _iter_lists(pool_feats, "dsir_buckets"):
            cs = np.concatenate([[0.0], np.cumsum(log_ratio[values])])
            sums = cs[offsets[1:]] - cs[offsets[:-1]]
            if p.length_normalize:
                sums = sums / np.maximum(1, offsets[1:] - offsets[:-1])
            out.append(sums)
        scores = np.concatenate(out) if out else np.zeros(0)
        return Scores(scores=scores, info={"target_features": int(tgt.sum() - p.smoothing * p.num_buckets)})
