"""``curriculum: mixture``: each optimizer step's rows drawn by domain with the weights the timeline gives that step.

How a step's rows are chosen
----------------------------
For optimizer step ``s`` the sampler fills the step's ``G = micro x accum x world`` slots.  Each slot's domain is an
independent draw with the weights ``timeline.value("mixture", s)``, from ``numpy.random.default_rng([seed, s])``, so
the domains of a step depend only on the seed and the step.  The rows of a domain come from that domain's own
stream: a permutation of its rows (``default_rng([seed, 1 + domain index, domain epoch])``), fresh each time the
domain is exhausted, so no row repeats before its domain has been seen whole.  The slots are then laid out like
every curriculum's (``samplers`` module docstring): rank ``r``'s micro-batch ``m`` of the step is slots
``[(m*W + r)*B, ... + B)``, so one process with ``grad_accum=2`` trains on exactly the rows of two with ``grad_accum=1``.

Resuming
--------
The state is the step, the micro-batch within it and how many rows each domain's stream has handed out before the
step.  A resumed run computes the same step's slots from the same generator and continues every stream where it
stopped: it sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.curriculum.samplers import StepSlotSampler
from effitrain.registry import ConfigError, choices_text


class MixtureSampler(StepSlotSampler):
    def __init__(self, domains: np.ndarray, timeline: Any, **layout: Any) -> None:
        super().__init__(len(domains), **layout)
        self._init_streams(domains)
        self.timeline = timeline
        declared = {d for _, weights in timeline.points["mixture"] for d, w in weights.items() if w > 0}
        missing = sorted(declared - set(self.names))
        if missing:
            raise ConfigError(f"timeline.mixture: domain '{missing[0]}' has no packed training rows; the training "
                              f"data's domains: {choices_text(self.names)}")

    def _init_streams(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        self.names = sorted(set(labels.tolist()))
        self.rows_of = [np.flatnonzero(labels == d) for d in self.names]
        self.drawn = [0] * len(self.names)  # rows each domain's stream handed out before ``step``
        self._drawn_after: list[int] = []
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -- the draw ----------------------------------------------------------------------------------------------
    def weights(self, step: int) -> np.ndarray:
        """The mixture at ``step`` over :attr:`names` (domains the timeline leaves out weigh 0)."""
        mix = self.timeline.value("mixture", step)
        w = np.array([mix.get(d, 0.0) for d in self.names], dtype=np.float64)
        return w / w.sum()

    def slot_domains(self, step: int) -> np.ndarray:
        """The domain index of each of the step's ``global_batch_size`` slots (a function of seed and step only)."""
        rng = np.random.default_rng([self.seed % 2**63, step])
        return rng.choice(len(self.names), size=self.global_batch_size, p=self.weights(step))

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.names):  # keep the current epoch of each domain, drop old ones
                self._perms = {kk: v for kk, v in self._perms.items() if kk[1] >= epoch - 1}
            self._perms[key] = np.random.default_rng([self.seed % 2**63, 1 + k, epoch]).permutation(
                len(self.rows_of[k]))
        return self._perms[key]

    def _take(self, k: int, start: int, n: int) -> np.ndarray:
        size = len(self.rows_of[k])
        positions = np.arange(start, start + n)
        out = np.empty(n, np.int64)
        for epoch in np.unique(positions // size):
            sel = positions // size == epoch
            out[sel] = self.rows_of[k][self._permutation(k, int(epoch))[positions[sel] % size]]
        return out

    def step_rows(self, step: int, drawn: list[int]) -> tuple[np.ndarray, list[int]]:
        """All ``global_batch_size`` rows of ``step`` in slot order, and the streams' counters after it."""
        slots = self.slot_domains(step)
        rows = np.empty(len(slots), np.int64)
        after = list(drawn)
        for k in range(len(self.names)):
            where = np.flatnonzero(slots == k)
            if len(where):
                rows[where] = self._take(k, after[k], len(where))
                after[k] += len(where)
        return rows, after

    # -- iteration and state -----------------------------------------------------------------------------------
    def slots(self, step: int) -> np.ndarray:
        rows, self._drawn_after = self.step_rows(step, self.drawn)
        return rows

    def step_done(self) -> None:
        self.drawn = self._drawn_after

    def state_dict(self) -> dict[str, Any]:
        return {**self.slot_state(), "drawn": dict(zip(self.names, self.drawn))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "drawn" not in state:
            raise ConfigError("resume: the checkpoint was written by another curriculum than 'mixture'; resume with "
                              "the run's own curriculum")
        if state["num_rows"] != self.num_rows or sorted(state["drawn"]) != self.names:
            raise ConfigError(f"resume: the checkpoint's sampler counted {state['num_rows']} packed rows in domains "
                              f"{choices_text(state['drawn'])}, this run has {self.num_rows} in "
                              f"{choices_text(self.names)}; the data changed")
        self.load_slot_state(state)
        self.drawn = [int(state["drawn"][d]) for d in self.names]

    def __repr__(self) -> str:
        return (f"MixtureSampler(domains={self.names}, global_batch={self.global_batch_size}, step={self.step}, "
                f"micro={self.micro})")


def build_mixture(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
                  rank: int, timeline: Any = None) -> MixtureSampler:
    """The ``curriculum: mixture`` builder; ``packed`` is the packed train dataset (its ``domain`` column is used)."""
    from effitrain.data.packing import domain_array

    if timeline is None or not timeline.declares("mixture"):
        raise ConfigError("curriculum: 'mixture' follows timeline.mixture, which is not declared")
    return MixtureSampler(domain_array(packed), timeline, seed=seed, micro_batch_size=micro_batch_size,
                          grad_accum=grad_accum, world_size=world_size, rank=rank)
