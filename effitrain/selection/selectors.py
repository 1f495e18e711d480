"""Selectors: turn a scorer's output into the chosen candidate indices under a budget.

Every selector gets ``scores`` (higher = wanted), optional ``clusters``, the ``weights`` the budget is counted in
(token counts, or ones for ``unit: examples``), the ``budget`` in those units and a numpy ``Generator``.  It returns
candidate indices (any order; the pipeline sorts them back into pool order).  Candidates dropped by the scorer's
``keep`` mask never reach a selector.  All are O(N log N) or better.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def take_until(order: np.ndarray, weights: np.ndarray, budget: float) -> np.ndarray:
    """The prefix of ``order`` whose weights first reach ``budget`` (at most one item over)."""
    if len(order) == 0:
        return order
    cum = np.cumsum(weights[order], dtype=np.float64)
    k = int(np.searchsorted(cum, budget - 1e-9, side="left")) + 1
    return order[:min(k, len(order))]


class _Selector:
    def __init__(self, params: Any) -> None:
        self.params = params

    def select(self, scores: np.ndarray, clusters: Optional[np.ndarray], weights: np.ndarray, budget: float,
               rng: np.random.Generator) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class RandomSelector(_Selector):
    """A uniformly random permutation cut at the budget."""

    def select(self, scores, clusters, weights, budget, rng):
        return take_until(rng.permutation(len(scores)), weights, budget)


class TopKSelector(_Selector):
    """Best scores first (ties broken at random, so equal scores do not follow pool order)."""

    def select(self, scores, clusters, weights, budget, rng):
        key = scores if self.params.descending else -scores
        tie = rng.random(len(scores))
        order = np.lexsort((tie, -key))  # last key is primary: descending score
        return take_until(order, weights, budget)


class GumbelTopKSelector(_Selector):
    """Sampling without replacement proportional to ``exp(score / T)``: the top-k of ``score / T + Gumbel(0, 1)``.

    With ``score = log w`` (DSIR's log importance weight) this is DSIR's importance resampling; sequentially taking
    the largest perturbed keys is exactly sampling without replacement with probabilities proportional to ``w``.
    """

    def select(self, scores, clusters, weights, budget, rng):
        keys = scores / self.params.temperature + rng.gumbel(size=len(scores))
        return take_until(np.argsort(-keys, kind="stable"), weights, budget)


class BandSelector(_Selector):
    """Keep scores inside the ``[low, high]`` quantile band, then a random order cut at the budget.

    When the band holds less than the budget the whole band is kept (reported as ``band_short`` by the pipeline
    through the kept counts)."""

    def select(self, scores, clusters, weights, budget, rng):
        lo, hi = np.quantile(scores, [self.params.low, self.params.high])
        inside = np.flatnonzero((scores >= lo) & (scores <= hi))
        return take_until(rng.permutation(inside), weights, budget)


class ClusterBalancedSelector(_Selector):
    """An equal share of the budget per cluster, visiting clusters from the smallest up (S2L's balanced sampling):
    a cluster smaller than its share gives all it has and passes the rest on to the larger ones."""

    def select(self, scores, clusters, weights, budget, rng):
        if clusters is None:
            raise ValueError("cluster_balanced selector needs cluster labels from the scorer")
        labels = np.unique(clusters)
        members = {c: np.flatnonzero(clusters == c) for c in labels}
        sizes = {c: float(weights[m].sum()) for c, m in members.items()}
        chosen = []
        remaining = float(budget)
        left = sorted(labels, key=lambda c: (sizes[c], c))
        while left and remaining > 1e-9:
            c = left.pop(0)
            share = remaining / (len(left) + 1)
            idx = members[c]
            if self.params.within == "score":
                order = idx[np.lexsort((rng.random(len(idx)), -scores[idx]))]
            else:
                order = rng.permutation(idx)
            if sizes[c] <= share:
                take = order
            else:
                take = take_until(order, weights, share)
            chosen.append(take)
            remaining -= float(weights[take].sum())
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
