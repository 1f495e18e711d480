"""Selectors: turn a scorer's output into the chosen candidate indices under a budget.

Every selector gets ``scores`` (higher = wanted), optional ``clusters``, the ``weights`` the budget is counted in
(token counts, or ones for ``unit: examples``), the ``budget`` in those units, a numpy ``Generator`` and, as the
keyword ``groups``, optional coarser labels (S2L's data sources).  It returns
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
               rng: np.random.Generator, groups: Optional[np.ndarray] = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class RandomSelector(_Selector):
    """A uniformly random permutation cut at the budget."""

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        return take_until(rng.permutation(len(scores)), weights, budget)


class TopKSelector(_Selector):
    """Best scores first (ties broken at random, so equal scores do not follow pool order)."""

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        key = scores if self.params.descending else -scores
        tie = rng.random(len(scores))
        order = np.lexsort((tie, -key))  # last key is primary: descending score
        return take_until(order, weights, budget)


class GumbelTopKSelector(_Selector):
    """Sampling without replacement proportional to ``exp(score / T)``: the top-k of ``score / T + Gumbel(0, 1)``.

    With ``score = log w`` (DSIR's log importance weight) this is DSIR's importance resampling; sequentially taking
    the largest perturbed keys is exactly sampling without replacement with probabilities proportional to ``w``.
    """

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        keys = scores / self.params.temperature + rng.gumbel(size=len(scores))
        return take_until(np.argsort(-keys, kind="stable"), weights, budget)


class BandSelector(_Selector):
    """Keep scores inside the ``[low, high]`` quantile band, then a random order cut at the budget.

    When the band holds less than the budget the whole band is kept (reported as ``band_short`` by the pipeline
    through the kept counts)."""

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        lo, hi = np.nanquantile(scores, [self.params.low, self.params.high])  # a NaN score is in no band
        inside = np.flatnonzero((scores >= lo) & (scores <= hi))
        return take_until(rng.permutation(inside), weights, budget)


class WindowSelector(_Selector):
    """One contiguous window of the sorted scores holding the budget (perplexity filtering as the papers select).

    Candidates are sorted by score (ascending; ties at random) and the window of consecutive candidates whose weights
    sum to the budget is kept: ``position: low`` starts at the lowest score, ``high`` ends at the highest, ``medium``
    is centred on the middle of the weight mass (Ankner et al. 2405.20541: "bottom", "middle" and "top" selection at
    a given selection rate)."""

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        order = np.lexsort((rng.random(len(scores)), scores))  # ascending score
        cum = np.cumsum(weights[order], dtype=np.float64)
        total = float(cum[-1]) if len(cum) else 0.0
        spare = max(0.0, total - float(budget))
        start_mass = {"low": 0.0, "medium": spare / 2.0, "high": spare}[self.params.position]
        # first candidate whose cumulative weight passes start_mass: the mass from there on is >= total - spare
        start = int(np.searchsorted(cum, start_mass + 1e-9, side="right")) if start_mass > 0 else 0
        return take_until(order[start:], weights, budget)


def _balanced(units: list, size: dict, budget: float, take: Any) -> tuple[list, float]:
    """S2L's balanced sampling over ``units``: visit them from the smallest up; each gets ``remaining / units left``;
    a unit smaller than its share gives all it has (``take(unit, None)``), a larger one ``take(unit, share)``.
    Returns the chosen index arrays and the budget left."""
    chosen = []
    remaining = float(budget)
    left = sorted(units, key=lambda u: (size[u], u))
    while left and remaining > 1e-9:
        u = left.pop(0)
        share = remaining / (len(left) + 1)
        got = take(u, None if size[u] <= share else share)
        chosen.append(got[0])
        remaining -= got[1]
    return chosen, remaining


class ClusterBalancedSelector(_Selector):
    """An equal share of the budget per cluster, visiting clusters from the smallest up (S2L's balanced sampling):
    a cluster smaller than its share gives all it has and passes the rest on to the larger ones.

    ``per_source: true`` first splits the budget the same way over the ``groups`` (S2L's data sources; here the
    pool's domains), then over the clusters inside each.  Clusters with fewer than ``min_cluster_size`` examples are
    left out of the balancing (S2L samples only clusters of size > 2) and drawn at random only when the others cannot
    fill the share."""

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        if clusters is None:
            raise ValueError("cluster_balanced selector needs cluster labels from the scorer")
        p = self.params
        if getattr(p, "per_source", False) and groups is not None:
            gmembers = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
            gsize = {g: float(weights[m].sum()) for g, m in gmembers.items()}

            def take_group(g, share):
                idx = gmembers[g]
                if share is None:
                    return idx, gsize[g]
                got = self._within(idx, scores, clusters, weights, share, rng)
                return got, float(weights[got].sum())

            chosen, _ = _balanced(list(gmembers), gsize, budget, take_group)
        else:
            chosen = [self._within(np.arange(len(scores)), scores, clusters, weights, budget, rng)]
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def _order(self, idx, scores, rng):
        if self.params.within == "score":
            return idx[np.lexsort((rng.random(len(idx)), -scores[idx]))]
        return rng.permutation(idx)

    def _within(self, idx, scores, clusters, weights, budget, rng):
        """Balanced sampling over the clusters among rows ``idx``."""
        labels, counts = np.unique(clusters[idx], return_counts=True)
        members = {c: idx[clusters[idx] == c] for c in labels}
        big = [c for c, n in zip(labels, counts) if n >= self.params.min_cluster_size]
        small = [c for c, n in zip(labels, counts) if n < self.params.min_cluster_size]
        size = {c: float(weights[members[c]].sum()) for c in labels}

        def take(c, share):
            if share is None:
                return members[c], size[c]
            got = take_until(self._order(members[c], scores, rng), weights, share)
            return got, float(weights[got].sum())

        chosen, remaining = _balanced(big, size, budget, take)
        if remaining > 1e-9 and small:  # S2L: what is left comes from the dropped small clusters, at random
            pool = np.concatenate([members[c] for c in small])
            chosen.append(take_until(rng.permutation(pool), weights, remaining))
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


class ClusterProportionalSelector(_Selector):
    """The same share of every cluster, best scores first (CodeACT's CDAS: ``int(len(cluster) * ratio)`` of each
    cluster, sorted by IFD).

    A cluster holding ``w_c`` of the candidates' weight gets ``budget * w_c / total`` of the budget (rounded down, as
    the authors' ``int``), so the selection keeps the clusters' proportions while taking their hardest examples."""

    def select(self, scores, clusters, weights, budget, rng, groups=None):
        if clusters is None:
            raise ValueError("cluster_proportional selector needs cluster labels from the scorer")
        total = float(weights.sum())
        if total <= 0:
            return np.zeros(0, dtype=np.int64)
        chosen = []
        for c in np.unique(clusters):
            idx = np.flatnonzero(clusters == c)
            share = budget * float(weights[idx].sum()) / total
            order = idx[np.lexsort((rng.random(len(idx)), -scores[idx]))]  # descending score, ties at random
            cum = np.cumsum(weights[order], dtype=np.float64)
            chosen.append(order[:int(np.searchsorted(cum, share + 1e-9, side="right"))])
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
