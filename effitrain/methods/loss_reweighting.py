"""Dynamic loss-based sample reweighting (Sow et al., ICLR 2025, arXiv 2502.06733) as an engine method.

Each micro-batch's examples are weighted by a function of their *current* loss, computed from the same forward that
is back-propagated (the losses are detached: the weights are constants of the step).  The authors' recipe (their
``src/trainer.py`` and README in sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025), for per-example mean token
losses ``l`` of a batch:

1. normalise to ``[-delta, delta]`` with the batch's min and max:
   ``h = 2·delta·l / (l_max − l_min) − delta·(l_max + l_min) / (l_max − l_min)``
   (``l_max − l_min`` at least 1e-6);
2. a weighting function ``f(h)`` — ``linupper``: ``min(h + delta, delta)``; ``quadratic`` (their ``mid``):
   ``1 − h²/delta²``; ``extremes``: ``|h|``;
3. ``w = exp((f − max f) / r)`` normalised to sum to 1 over the batch; ``r`` (their ``kl_reg``) sets how far from
   uniform the weights go (r → ∞: uniform);
4. before ``warmup`` steps (their ``burnout_steps``) every example weighs the same.

The method puts a :class:`LossWeighting` in ``batch["example_weights"]``; ``objective: weighted_causal_lm`` calls it
with the per-example losses of its forward and minimises ``Σ w_i l_i / Σ w_i``.  :func:`loss_weights` is the
shared, torch-only piece other loss-driven methods can reuse.
"""

from __future__ import annotations

from typing import Any

import torch

from effitrain.engine.events import Hook
from effitrain.objectives.common import EXAMPLE_WEIGHTS

STRATEGIES = {
    "linupper": lambda h, delta: torch.minimum(h + delta, torch.full_like(h, delta)),
    "quadratic": lambda h, delta: 1 - h ** 2 / delta ** 2,
    "extremes": lambda h, delta: h.abs(),
}


def normalise_losses(losses: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """The batch's losses mapped linearly onto ``[-delta, delta]`` (min → −delta, max → delta)."""
    low, high = losses.min(), losses.max()
    span = (high - low).clamp(min=1e-6)
    return 2 * delta * losses / span - delta * (high + low) / span


def loss_weights(losses: torch.Tensor, *, strategy: str, r: float, delta: float = 1.0) -> torch.Tensor:
    """Per-example weights (summing to 1) from per-example losses ``[B]``, by the paper's steps 1-3."""
    losses = losses.detach().double()
    f = STRATEGIES[strategy](normalise_losses(losses, delta), delta)
    g = torch.exp((f - f.max()) / r)
    return (g / g.sum()).float()


class LossWeighting:
    """The value a hook puts in ``batch['example_weights']``: weights computed from the objective's own losses."""

    def __init__(self, strategy: str, r: float, delta: float) -> None:
        self.strategy, self.r, self.delta = strategy, r, delta

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        return loss_weights(losses, strategy=self.strategy, r=self.r, delta=self.delta)


class LossReweighting(Hook):
    name = "loss_reweighting"

    def __init__(self, *, strategy: str, r: float, delta: float, warmup_fraction: float) -> None:
        self.weighting = LossWeighting(strategy, r, delta)
        self.warmup_fraction = warmup_fraction
        self.warmup_steps = 0

    def on_fit_start(self, state: Any) -> None:
        # a fraction of the run, so a scaled-down run keeps the paper's share (1,000 of 20,000 steps) of warm-up
        self.warmup_steps = int(round(self.warmup_fraction * state.spec.train.max_steps))

    def on_batch_start(self, state: Any) -> None:
        if state.step >= self.warmup_steps:  # before: no weights, so every example weighs the same
            state.batch[EXAMPLE_WEIGHTS] = self.weighting


def build_loss_reweighting(params: Any) -> LossReweighting:
    return LossReweighting(strategy=params.strategy, r=params.r, delta=params.delta,
                           warmup_fraction=params.warmup_fraction)
