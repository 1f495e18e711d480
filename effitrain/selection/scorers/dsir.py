"""DSIR scorer (Xie et al. 2023, arXiv 2302.03169): importance weights in a hashed n-gram feature space.

Features, as in the authors' ``data_selection/hashed_ngram_dsir.py``: the text is lower-cased and split by NLTK's
``WordPunctTokenizer`` rule (runs of word characters, or runs of other non-space characters); every unigram and
bigram (``ngram: 2``) is hashed with sha256 into ``num_buckets`` buckets.  Estimator: the pool ("raw") distribution
is the bucket counts of the candidates divided by their sum, **no pseudo-count**; the target distribution likewise,
with ``target_smoothing`` pseudo-counts (0 by default, as theirs); the log importance weight of a bucket is
``log(p_target + 1e-8) - log(p_raw + 1e-8)`` (their epsilon), and a document's score is the dot product of that
vector with its bucket counts.  Documents with fewer than ``min_length`` word/punctuation tokens are filtered out
before resampling (their ``min_example_length: 100``); the ``gumbel_topk`` selector then resamples without
replacement proportional to ``exp(score)`` (their ``resample``: log weight + Gumbel noise, top-k).

Our addition, not in the paper: ``pool_mix`` mixes that share of the raw distribution into the target's before the
log (``p_target' = (1 - pool_mix) p_target + pool_mix p_raw``).  With a target of tens of documents most buckets of
any pool document were never seen in the target; the paper's estimate then gives each of them ``log(1e-8)`` and ranks
documents by how many unseen n-grams they hold.  ``pool_mix`` bounds that penalty to about ``log(pool_mix)``.
``pool_mix: 0`` (the schema default) is exactly the paper's estimate.

Needs: a target set.  Cost: one featurizing pass over pool and target (sha256 per n-gram), then one dot product per
document; features are stored as a list column of bucket ids (about 8 bytes per n-gram in the Arrow cache), memory
O(num_buckets).  CPU only, parallel with ``num_proc``.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.scorers._util import batched_map

# NLTK's WordPunctTokenizer: r"\w+|[^\w\s]+"
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")
EPS = 1e-8  # added inside both logs, as in the authors' estimator


def wordpunct(text: str) -> list[str]:
    return _WORDPUNCT.findall(text)


def bucket(gram: str, num_buckets: int) -> int:
    # int.from_bytes of the digest is the hex digest's integer, without formatting and parsing 64 hex digits
    return int.from_bytes(hashlib.sha256(gram.encode("utf-8")).digest(), "big") % num_buckets


_WORD_BUCKETS: dict[tuple[str, int], int] = {}
_WORD_BUCKETS_MAX = 1 << 17  # about 20 MB: a vocabulary's common words, not a corpus's every bigram


def _word_bucket(word: str, num_buckets: int) -> int:
    """``bucket`` of a unigram, remembered: words repeat (Zipf), so most unigrams are a dict lookup instead of a
    sha256.  Bigrams are mostly new and are hashed every time; the memo stops growing at its cap."""
    key = (word, num_buckets)
    b = _WORD_BUCKETS.get(key)
    if b is None:
        b = bucket(word, num_buckets)
        if len(_WORD_BUCKETS) < _WORD_BUCKETS_MAX:
            _WORD_BUCKETS[key] = b
    return b


def hashed_ngrams(text: str, num_buckets: int, ngram: int, lowercase: bool = True) -> list[int]:
    """Bucket ids of every 1..ngram-gram of the lower-cased word/punctuation tokens (one id per occurrence)."""
    words = wordpunct(text.lower() if lowercase else text)
    ids = [_word_bucket(w, num_buckets) for w in words]
    for n in range(2, ngram + 1):
        ids += [bucket(" ".join(words[i:i + n]), num_buckets) for i in range(len(words) - n + 1)]
    return ids


def _featurize(batch, num_buckets, ngram, lowercase):
    feats, lengths = [], []
    for t in batch["text"]:
        feats.append(hashed_ngrams(t, num_buckets, ngram, lowercase))
        lengths.append(len(wordpunct(t.lower() if lowercase else t)))
    return {"dsir_buckets": feats, "dsir_length": lengths}


def log_importance(pool_counts: np.ndarray, target_counts: np.ndarray, target_smoothing: float = 0.0,
                   pool_mix: float = 0.0) -> np.ndarray:
    """Per-bucket ``log p_target - log p_raw`` (the authors' estimator; ``pool_mix`` is our addition)."""
    p_raw = pool_counts / pool_counts.sum()
    tgt = target_counts + target_smoothing
    p_tgt = tgt / tgt.sum()
    if pool_mix > 0:
        p_tgt = (1.0 - pool_mix) * p_tgt + pool_mix * p_raw
    return np.log(p_tgt + EPS) - np.log(p_raw + EPS)


def document_scores(log_w: np.ndarray, values: np.ndarray, offsets: np.ndarray,
                    length_normalize: bool = False) -> np.ndarray:
    """Each document's ``sum(log_w[bucket])`` over its features (``values[offsets[i]:offsets[i + 1]]``).

    Every document is summed on its own (``np.add.reduceat``), never as a difference of running sums over a batch:
    the score of a document is then the same bits whichever documents share its batch, which is what lets the
    sharded path (:mod:`effitrain.selection.sharded_dsir`, a file at a time) equal this one exactly."""
    lengths = offsets[1:] - offsets[:-1]
    if len(lengths) == 0:
        return np.zeros(0)
    terms = np.append(log_w[values], 0.0)  # reduceat's indices must be < len: an empty last document reads the 0
    sums = np.add.reduceat(terms, offsets[:-1])
    sums[lengths == 0] = 0.0  # reduceat gives an empty segment the element at its start
    if length_normalize:
        sums = sums / np.maximum(1, lengths)
    return sums


def _iter_lists(ds, column):
    """(flat values, offsets) of a list column, batch by batch."""
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=65536):
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
        return batched_map(ds.select_columns(["text"]), _featurize, tag=f"dsir2-{tag}", payload=kw, ctx=ctx,
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
        target_counts = self._counts(target_feats)
        log_w = log_importance(self._counts(pool_feats), target_counts, p.target_smoothing, p.pool_mix)
        out = [document_scores(log_w, values, offsets, p.length_normalize)
               for values, offsets in _iter_lists(pool_feats, "dsir_buckets")]
        scores = np.concatenate(out) if out else np.zeros(0)
        lengths = np.asarray(pool_feats["dsir_length"], dtype=np.int64)
        keep = lengths >= p.min_length
        if len(keep) and not keep.any():
            from effitrain.registry import ConfigError
            raise ConfigError(f"selection.scorer.min_length: every candidate has fewer than {p.min_length} "
                              f"word/punctuation tokens (longest: {int(lengths.max())}); lower it")
        return Scores(scores=scores, keep=keep,
                      info={"target_features": int(target_counts.sum()),
                            "below_min_length": int((~keep).sum())})
