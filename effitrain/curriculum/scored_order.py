"""``curriculum: scored_order``: the rows sorted by a score, the same order every epoch (no shuffling).

The quality curriculum of Luo et al. 2025 ("How Learning Rate Decay Wastes Your Best Data in Curriculum-Based LLM
Pretraining") trains on data sorted by ascending quality.  The score is any target-free selection scorer run on the
rows (:mod:`effitrain.curriculum.row_scores`); ``order: ascending`` puts the lowest score first.  With the
``perplexity`` scorer the score is a proxy model's loss, so *ascending quality* is ``order: descending`` (highest
loss first).  Ties keep a seeded random order.  State and resume are the base sampler's (epoch, position).

The paper makes one sorted pass over its training tokens.  A run shorter than an epoch of all rows would only see the
low end of the order and never the best data, so by default (``fit_to_run``) the order is a uniformly random subset
of ``max_steps x global batch`` rows (all rows when the run is longer), sorted: the run ends on the top of the
order.  The rows left out are a random sample, so the subset's quality distribution is the pool's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.curriculum.row_scores import row_order
from effitrain.curriculum.samplers import ResumableBatchSampler


class ScoredOrderSampler(ResumableBatchSampler):
    def __init__(self, order: np.ndarray, **layout: Any) -> None:
        super().__init__(len(order), **layout)
        self.order = np.asarray(order, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.order


def run_subset(order: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """``order`` restricted to a uniformly random ``rows`` of its entries, keeping their order."""
    if rows >= len(order):
        return order
    keep = np.zeros(len(order), bool)
    keep[np.random.default_rng([seed % 2**63, 11]).choice(len(order), size=rows, replace=False)] = True
    # a block of the order at a time: an order memory-mapped from disk (token shards) is not loaded whole
    block = 1 << 20
    kept = [part[keep[part]] for part in (np.asarray(order[s:s + block]) for s in range(0, len(order), block))]
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def build_scored_order(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                       world_size: int, rank: int, tokenizer: Any = None, timeline: Any = None) -> ScoredOrderSampler:
    order = row_order(params.scorer, params.domain_order, packed, tokenizer, seed=seed, key="curriculum")
    if params.order == "descending":
        order = order[::-1]  # a view: an order on disk stays there
    if params.fit_to_run and timeline is not None:
        order = run_subset(order, timeline.max_steps * micro_batch_size * grad_accum * world_size, seed)
    return ScoredOrderSampler(order, seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                              world_size=world_size, rank=rank)
