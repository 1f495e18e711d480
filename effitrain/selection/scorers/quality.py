"""Quality-classifier scorer (PreSelect, arXiv 2503.00808; BETR, arXiv 2507.12466 style): a linear classifier told
apart the target examples (label 1) from a random sample of the pool (label 0); an example's score is the
classifier's log-odds of "target".  Features: word 1..ngram_max-grams in a ``HashingVectorizer`` (stateless, so the
scoring pass runs in batches with ``num_proc`` workers); model: scikit-learn logistic regression with balanced
class weights.  fastText is the papers' choice; a hashed linear model is the same family and needs no binary wheel.

Needs: a target set.  Cost: training on target + ``negatives`` examples (seconds), then one vectorize + dot product
per example (tens of thousands of examples/s per core).
"""

from __future__ import annotations

import hashlib

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.scorers._util import batched_map


def _vectorizer(p):
    from sklearn.feature_extraction.text import HashingVectorizer
    return HashingVectorizer(n_features=p.n_features, ngram_range=(1, p.ngram_max), alternate_sign=False,
                             norm="l2", lowercase=True)


def _score_batch(batch, vectorizer, clf):
    return {"quality": clf.decision_function(vectorizer.transform(batch["text"])).tolist()}


class QualityClassifierScorer:
    def __init__(self, params) -> None:
        self.params = params

    def score(self, candidates, ctx) -> Scores:
        from sklearn.linear_model import LogisticRegression

        p = self.params
        rng = np.random.default_rng(ctx.seed)
        neg_idx = np.sort(rng.permutation(len(candidates))[:p.negatives])
        pos = list(ctx.target["text"])
        neg = list(candidates.select(neg_idx)["text"])
        vec = _vectorizer(p)
        x = vec.transform(pos + neg)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        clf = LogisticRegression(C=p.C, class_weight="balanced", max_iter=2000, random_state=ctx.seed)
        clf.fit(x, y)
        scored = batched_map(candidates.select_columns(["text"]), _score_batch, tag="quality",
                             payload={"clf": hashlib.sha256(clf.coef_.tobytes() + clf.intercept_.tobytes()).hexdigest(),
                                      "params": repr(p)}, ctx=ctx, fn_kwargs={"vectorizer": vec, "clf": clf})
        return Scores(scores=column_numpy(scored, "quality", np.float64),
                      info={"train_accuracy": round(float(clf.score(x, y)), 4), "negatives": len(neg)})
