"""Facility-location scorer (INGENIOUS, Renduchintala et al. 2023, arXiv 2305.06677; the authors' selection code is
``SubmodStrategy`` in their fork of CORDS, which calls submodlib): a representative subset of the pool.

1. **Embeddings**: the reference model's pooled hidden states, L2-normalized (:mod:`effitrain.selection.embeddings`).
2. **Partitions**: the pool is cut into random partitions of about ``partition_size`` documents (their
   ``partition_strategy="random"``: a shuffled index list cut into equal chunks; ``kmeans`` is their other choice),
   so the similarity matrix is only ever ``partition_size`` squared.
3. **Facility location** in each partition, ``f(S) = sum_i max(0, max_{j in S} cos(i, j))`` (submodlib's dense
   ``FacilityLocationFunction`` over a cosine kernel: coverage starts at 0, so negative similarities cover nothing),
   maximized by the **lazy greedy** (Minoux) over the *whole* partition: the greedy order with each pick's gain.
   The order of a partition does not depend on the budget (greedy picks one element at a time).
4. **Sampling** (``sampling: taylor_softmax``, the authors' training script): each partition's picks are drawn
   without replacement with probabilities ``taylor_softmax(gain / temperature)`` over its greedy order, so documents
   with large gains are likely but not certain; ``sampling: greedy`` keeps the greedy order itself.
5. **Budget in proportion**: the authors give partition P ``ceil(|P| / N * budget)`` picks.  A candidate's score is
   ``-(its position in its partition's order + 1) / |P|``, so ``topk`` takes the same leading share of every
   partition's order, whatever the budget.

Representations: the authors take one hidden layer's state at the document's last token (``pooling: last``).  They
redraw the subset every ``select_every`` steps of training; the selection stage draws once.

Own lazy greedy, not apricot-select: apricot's last release (0.6.1, 2021) pulls numba, llvmlite and nose for what is
a heap and a vector maximum here, and has no partitioned variant.  Cost: one forward pass per candidate, then per
partition a ``partition_size``-squared similarity matrix and about ``partition_size`` x (a few) O(partition_size)
gain evaluations.
"""

from __future__ import annotations

import heapq

import numpy as np

from effitrain.selection.base import Scores
from effitrain.selection.embeddings import embed_dataset, normalize_rows
from effitrain.selection.refmodel import ModelScorer, device_of, reference_or_proxy


def facility_location_value(sim: np.ndarray, chosen) -> float:
    """``f(S) = sum_i max(0, max_{j in S} sim[i, j])`` (0 for the empty set)."""
    chosen = list(chosen)
    if not chosen:
        return 0.0
    return float(np.maximum(sim[:, chosen].max(axis=1), 0.0).sum())


def lazy_greedy(sim: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximization of facility location over a symmetric similarity matrix: ``(order, gains)`` of the first
    ``k`` picks (default all).  Lazy: a candidate's last computed gain bounds its current one (submodularity), so
    only the head of the heap is re-evaluated; the picks equal the plain greedy's (ties aside)."""
    m = sim.shape[0]
    k = m if k is None else min(k, m)
    cover = np.zeros(m)                        # each element's similarity to its nearest pick so far
    heap = [(-float(g), j) for j, g in enumerate(np.maximum(sim, 0.0).sum(axis=1))]
    heapq.heapify(heap)
    order, gains = [], []
    while heap and len(order) < k:
        _, j = heapq.heappop(heap)
        gain = float(np.maximum(sim[j] - cover, 0.0).sum())   # sim symmetric: row j is column j
        if not heap or gain >= -heap[0][0]:
            order.append(j)
            gains.append(gain)
            cover = np.maximum(cover, sim[j])
        else:
            heapq.heappush(heap, (-gain, j))
    return np.asarray(order, dtype=np.int64), np.asarray(gains, dtype=np.float64)


def random_partitions(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation of ``range(n)`` cut into ``ceil(n / size)`` chunks of (nearly) equal length."""
    parts = max(1, -(-n // size))
    return [np.sort(p) for p in np.array_split(rng.permutation(n), parts) if len(p)]


def kmeans_partitions(x: np.ndarray, size: int, seed: int) -> list[np.ndarray]:
    from effitrain.selection.scorers.lm import kmeans
    labels, _ = kmeans(x, max(1, -(-len(x) // size)), seed)
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def taylor_softmax(x: np.ndarray) -> np.ndarray:
    """Second-order Taylor softmax: ``(1 + x + x^2 / 2)`` normalized (the authors' ``taylor_softmax_v1``, n = 2)."""
    f = 1.0 + x + x * x / 2.0
    return f / f.sum()


def sampled_order(order: np.ndarray, gains: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """The greedy picks re-ordered by sampling without replacement with probabilities
    ``taylor_softmax(gains / temperature)``: any prefix of the result is a draw of that size, as the authors'
    ``rng.choice(greedyList, size=budget, replace=False, p=probs)`` (Gumbel top-k: sorting by ``log p + Gumbel``
    is sequential sampling without replacement in proportion to ``p``)."""
    p = taylor_softmax(gains / temperature)
    keys = np.log(np.maximum(p, 1e-300)) + rng.gumbel(size=len(p))
    return order[np.argsort(-keys, kind="stable")]


def partitioned_greedy(x: np.ndarray, partitions: list[np.ndarray], sampling: str = "greedy",
                       temperature: float = 1.0, rng: np.random.Generator | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x``: N x H unit vectors.  Returns ``(share, gain, label)`` per row: the position in its partition's order as
    a share ``(position + 1) / |P|``, the row's greedy gain, and the partition index.  The order is the greedy's
    (``sampling: greedy``) or a Taylor-softmax draw from it (``taylor_softmax``)."""
    n = len(x)
    share, gain, label = np.empty(n), np.empty(n), np.empty(n, dtype=np.int64)
    for p, rows in enumerate(partitions):
        sim = x[rows] @ x[rows].T
        order, gains = lazy_greedy(sim)
        gain[rows[order]] = gains
        if sampling == "taylor_softmax":
            order = sampled_order(order, gains, temperature, rng if rng is not None else np.random.default_rng(0))
        share[rows[order]] = (np.arange(len(order)) + 1) / len(rows)
        label[rows] = p
    return share, gain, label


class FacilityLocationScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        p = self.params
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "ingenious")
        x = normalize_rows(embed_dataset(candidates, model, encode, device=device_of(p), layer=p.layer,
                                         pooling=p.pooling, model_tag=tag, max_length=p.max_length,
                                         batch_size=p.batch_size)).astype(np.float64)
        if p.partition_strategy == "kmeans":
            parts = kmeans_partitions(x, p.partition_size, ctx.seed)
        else:
            parts = random_partitions(len(x), p.partition_size, np.random.default_rng(ctx.seed))
        share, gain, _ = partitioned_greedy(x, parts, p.sampling, p.temperature,
                                            np.random.default_rng([ctx.seed, 1]))
        return Scores(scores=-share,
                      info={**info, "partitions": len(parts), "largest_partition": max((len(r) for r in parts), default=0),
                            "embedding_dim": int(x.shape[1]),
                            # the greedy runs to the end of each partition, where coverage is total (the sum of
                            # all gains is N); the first (largest) gains say how much one document covers
                            "first_gain_mean": round(float(np.mean([gain[r].max() for r in parts])), 3)
                            if parts else None})
