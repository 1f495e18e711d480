"""``curriculum: seta`` -- Scale Efficient Training (SeTa; Zhou, Gao, Wang, CVPR 2025, arXiv 2503.13385).

Dynamic data pruning by the training model's own per-example losses, re-decided at every epoch, as the authors'
``seta.py`` (github.com/mrazhou/SeTa: ``SeTa.prune``, ``kmeans_group``, ``slide_easy2hard``, ``IBSampler.reset``):

1. **random pruning**: a uniformly random ``keep_ratio = clamp(1 - prune_ratio, 0.1, 1)`` share of the rows;
2. **loss-based clustering**: 1-D k-means (scikit-learn, ``random_state=0``) of those rows' latest training losses into
   ``num_group`` groups, sorted by mean loss (easy first).  Rows never trained on count ``initial_loss`` (the
   authors' 3); when all losses are equal the rows are cut into ``num_group`` consecutive chunks instead;
3. **sliding window, easy to hard**: epoch ``e`` (counting from 0) trains on the groups ``[s, s + w)`` with
   ``w = round(num_group * window_scale)`` and ``s = e mod (num_group - w + 1)``; epoch 0 takes every group.
   The window therefore moves from the easiest groups to the hardest and starts over.
4. **annealing**: from the first epoch that starts at or after ``anneal * max_steps`` optimizer steps (the authors'
   ``delta * num_epochs`` epochs; they count epochs, this run counts steps) every epoch is a plain random
   ``keep_ratio`` share.

The selected rows are shuffled (``numpy.random.default_rng([seed, epoch])``; the same generator draws the random
pruning) and laid out like every curriculum's batches (``samplers`` module docstring).  An epoch holds
``len(selected) // global_batch`` optimizer steps, so epochs have different lengths (a window holding less than one
global batch, possible with very uneven groups, is topped up with random rows of the pruned share outside it).

The losses come from the :class:`~effitrain.curriculum.loss_tracker.ExampleLossTracker` this sampler owns
(``sampler.hook``), fed by the objective's per-example losses (``objective: weighted_causal_lm``).

Resuming: the state is the epoch, the position in it, the step at which it started and the epoch's row order; the
tracker's losses are in the hooks' state.  A resumed run continues the stored order and decides the next epoch from
the same losses, so it sees the batches of the uninterrupted run.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from effitrain.curriculum.loss_tracker import ExampleLossTracker
from effitrain.registry import ConfigError


def keep_ratio(prune_ratio: float) -> float:
    """The authors' ``min(1, max(0.1, 1 - prune_ratio))``."""
    return min(1.0, max(0.1, 1.0 - prune_ratio))


def loss_groups(losses: np.ndarray, rows: np.ndarray, num_group: int) -> list[np.ndarray]:
    """``rows`` split into ``num_group`` groups by 1-D k-means of their ``losses``, easiest (lowest mean) first."""
    if num_group == 1:
        return [rows]
    if losses.max() == losses.min():
        return list(np.array_split(rows, num_group))
    from sklearn.cluster import KMeans
    labels = KMeans(n_clusters=num_group, random_state=0, n_init="auto").fit(losses.reshape(-1, 1)).labels_
    groups = [(float(losses[labels == g].mean()), rows[labels == g]) for g in range(num_group) if (labels == g).any()]
    return [members for _, members in sorted(groups, key=lambda g: g[0])]


def window(num_group: int, window_scale: float, iteration: int) -> tuple[int, int]:
    """The groups ``[start, end)`` of pruning epoch ``iteration``: all of them first, then a window sliding up."""
    if iteration == 0:
        return 0, num_group
    size = round(num_group * window_scale)
    start = iteration % (num_group - size + 1)
    return start, start + size


class SetaSampler:
    """Per-epoch SeTa selection over the packed rows, with the resumable state of the module docstring."""

    def __init__(self, num_rows: int, *, prune_ratio: float, num_group: int, window_scale: float, anneal: float,
                 initial_loss: float, max_steps: int, seed: int, micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int) -> None:
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.micro_batch_size, self.grad_accum, self.world_size, self.rank = (micro_batch_size, grad_accum,
                                                                             world_size, rank)
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        self.keep = keep_ratio(prune_ratio)
        self.num_group, self.window_scale = num_group, window_scale
        self.anneal_step = anneal * max_steps
        kept = int(self.num_rows * self.keep)
        smallest = kept * max(1, round(num_group * window_scale)) // num_group
        if kept < num_group or smallest < self.global_batch_size:
            raise ConfigError(f"curriculum.window_scale: a SeTa window keeps about {smallest} of the "
                              f"{self.num_rows} packed rows ({kept} after random pruning), fewer than one global batch "
                              f"of {self.global_batch_size}; lower curriculum.prune_ratio or the batch size, or add data")
        self.hook = ExampleLossTracker(self.num_rows, initial=initial_loss, name="seta_losses")
        self.epoch = 0
        self.position = 0              # micro-batches this rank has taken in the epoch
        self.epoch_start_step = 0      # optimizer steps completed when the epoch began
        self.order: Optional[np.ndarray] = None
        self.info: dict[str, Any] = {}

    # -- the selection -----------------------------------------------------------------------------------------
    def select(self, epoch: int, start_step: int, losses: np.ndarray) -> np.ndarray:
        """The rows of ``epoch`` in training order, given every row's latest loss."""
        rng = np.random.default_rng([self.seed % 2**63, epoch])
        kept = rng.permutation(self.num_rows)[:int(self.num_rows * self.keep)]   # 1. random pruning
        if start_step >= self.anneal_step:                                      # 4. annealing
            self.info = {"epoch": epoch, "annealing": True, "rows": len(kept)}
            return kept
        groups = loss_groups(losses[kept], kept, self.num_group)               # 2. loss clusters, easy first
        lo, hi = window(len(groups), self.window_scale, epoch)                 # 3. the sliding window
        chosen = np.concatenate(groups[lo:hi])
        if len(chosen) < self.global_batch_size:   # uneven k-means groups: never an epoch without one optimizer step
            rest = np.setdiff1d(kept, chosen)
            chosen = np.concatenate([chosen, rng.permutation(rest)[:self.global_batch_size - len(chosen)]])
        self.info = {"epoch": epoch, "annealing": False, "window": [lo, hi],
                     "group_sizes": [len(g) for g in groups], "rows": len(chosen)}
        return rng.permutation(chosen)

    def micro_batches_in(self, order: np.ndarray) -> int:
        return (len(order) // self.global_batch_size) * self.grad_accum

    # -- iteration and state -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self.order is None:
                self.order = self.select(self.epoch, self.epoch_start_step, self.hook.scores())
            if self.position >= self.micro_batches_in(self.order):
                self.epoch += 1
                self.epoch_start_step += self.micro_batches_in(self.order) // self.grad_accum
                self.position, self.order = 0, None
                continue
            start = (self.position * self.world_size + self.rank) * self.micro_batch_size
            batch = self.order[start:start + self.micro_batch_size].tolist()
            self.position += 1
            self.hook.expect(batch)
            yield batch

    @property
    def micro_batches_seen(self) -> int:
        return self.epoch_start_step * self.grad_accum + self.position

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "epoch_start_step": self.epoch_start_step,
                "order": None if self.order is None else self.order.astype(np.int64).tolist(),
                "num_rows": self.num_rows, "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "epoch_start_step" not in state:
            raise ConfigError("resume: the checkpoint was written by another curriculum than 'seta'; resume with the "
                              "run's own curriculum")
        if state["num_rows"] != self.num_rows or state["global_batch_size"] != self.global_batch_size:
            raise ConfigError(f"resume: the checkpoint's SeTa sampler had {state['num_rows']} rows and a global batch "
                              f"of {state['global_batch_size']}, this run {self.num_rows} and "
                              f"{self.global_batch_size}; resuming would not continue the same batches")
        consumed = int(state["position"]) * state["micro_batch_size"] * state["world_size"]
        per_micro = self.micro_batch_size * self.world_size
        if consumed % per_micro:
            raise ConfigError("resume: the checkpoint stopped inside an optimizer step at a point this run's "
                              "micro-batch layout cannot continue from")
        self.epoch, self.position = int(state["epoch"]), consumed // per_micro
        self.epoch_start_step = int(state["epoch_start_step"])
        self.order = None if state["order"] is None else np.asarray(state["order"], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"SetaSampler(rows={self.num_rows}, keep={self.keep}, groups={self.num_group}, "
                f"window_scale={self.window_scale}, epoch={self.epoch}, position={self.position})")


def build_seta(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
               rank: int, timeline: Any = None) -> SetaSampler:
    """The ``curriculum: seta`` builder; ``packed`` is the packed train dataset (only its length is used)."""
    max_steps = timeline.max_steps if timeline is not None else 0
    return SetaSampler(len(packed), prune_ratio=params.prune_ratio, num_group=params.num_group,
                       window_scale=params.window_scale, anneal=params.anneal, initial_loss=params.initial_loss,
                       max_steps=max_steps, seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                       world_size=world_size, rank=rank)
