"""``curriculum: difficulty``: rows ordered by difficulty, paced by ``timeline.competence``.

Difficulty is a per-row score (:mod:`effitrain.curriculum.row_scores`: a reference/proxy model's loss, or a declared
domain order) turned into a rank in [0, 1]; ``direction: hard_first`` reverses it (anti-curriculum).  The competence
``c(s)`` in (0, 1] is ``timeline.value("competence", s)`` (a pacing function or points, shown by ``effitrain plan``).

``mode: sample`` — competence-based curriculum (Platanios et al. 2019; Hacohen & Weinshall 2019 with step pacing):
  the ``G = micro x accum x world`` rows of optimizer step ``s`` are drawn uniformly without replacement from the
  ``max(G, ceil(c(s) N))`` easiest rows, with ``numpy.random.default_rng([seed, s])``; they are then laid out like
  every curriculum's (``samplers`` module docstring).  A step's rows depend only on the seed, the step and the
  competence, so the state is just ``(step, micro)`` and a resumed run draws exactly the same batches.

``mode: weight`` — MacAvaney et al. 2020 ("Training curricula for open domain answer re-ranking"): every row is in
  play from the start (a fresh permutation per epoch, as ``shuffle``), and the hook :class:`DifficultyWeights` sets
  each example's weight ``w = 1 - d (1 - c(s))`` (``d`` = difficulty in [0, 1]) in ``batch["example_weights"]`` for
  ``objective: weighted_causal_lm``: with a linear competence from ``c0`` to 1 at the scheduled step, the hardest
  rows start at weight ``c0`` and every weight reaches 1 (uniform) at that step, the paper's linear weighting.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from effitrain.curriculum.row_scores import difficulty_of, row_order
from effitrain.curriculum.samplers import ShuffleSampler, StepSlotSampler
from effitrain.engine.events import Hook
from effitrain.registry import ConfigError


class PacedDifficultySampler(StepSlotSampler):
    """``mode: sample``: each step's rows drawn from the easiest ``c(s)`` share of the rows."""

    def __init__(self, order: np.ndarray, timeline: Any, **layout: Any) -> None:
        super().__init__(len(order), **layout)
        self.order = np.asarray(order, dtype=np.int64)   # easiest first (already reversed for hard_first)
        self.timeline = timeline

    def available(self, step: int) -> int:
        """How many of the easiest rows step ``step`` draws from (at least one global batch)."""
        c = float(self.timeline.value("competence", step))
        return min(self.num_rows, max(self.global_batch_size, math.ceil(c * self.num_rows - 1e-9)))

    def slots(self, step: int) -> np.ndarray:
        """All ``global_batch_size`` rows of ``step`` in slot order (a function of seed and step only)."""
        n = self.available(step)
        rng = np.random.default_rng([self.seed % 2**63, step])
        return self.order[rng.choice(n, size=self.global_batch_size, replace=False)]

    def state_dict(self) -> dict[str, Any]:
        return {**self.slot_state(), "paced": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("paced"):
            raise ConfigError("resume: the checkpoint was written by another curriculum than 'difficulty' "
                              "(mode: sample); resume with the run's own curriculum")
        if state["num_rows"] != self.num_rows:
            raise ConfigError(f"resume: the checkpoint's sampler counted {state['num_rows']} packed rows, this run "
                              f"has {self.num_rows}; the data changed")
        self.load_slot_state(state)


class WeightedDifficultySampler(ShuffleSampler):
    """``mode: weight``: the shuffled order; remembers the micro-batch it handed out last for the weight hook."""

    def __init__(self, difficulty: np.ndarray, timeline: Any, **layout: Any) -> None:
        super().__init__(len(difficulty), **layout)
        self.difficulty = np.asarray(difficulty, dtype=np.float64)
        self.last_batch: list[int] = []
        self.hook = DifficultyWeights(self, timeline)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            self.last_batch = batch
            yield batch


class DifficultyWeights(Hook):
    """Sets ``batch["example_weights"] = 1 - d (1 - c(step))`` for the rows of the current micro-batch.  Stateless:
    the weights are a function of the rows (from the resumed sampler) and the step."""
    name = "difficulty_weights"

    def __init__(self, sampler: WeightedDifficultySampler, timeline: Any) -> None:
        self.sampler = sampler
        self.timeline = timeline

    def weights(self, rows: list[int], step: int) -> np.ndarray:
        c = float(self.timeline.value("competence", step))
        return 1.0 - self.sampler.difficulty[rows] * (1.0 - c)

    def on_batch_start(self, state: Any) -> None:
        import torch

        from effitrain.objectives.common import EXAMPLE_WEIGHTS

        state.batch[EXAMPLE_WEIGHTS] = torch.as_tensor(self.weights(self.sampler.last_batch, state.step),
                                                       dtype=torch.float32)


def build_difficulty(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                     world_size: int, rank: int, timeline: Any = None, tokenizer: Any = None) -> Any:
    """The ``curriculum: difficulty`` builder (``packed``: the packed train dataset)."""
    if timeline is None or not timeline.declares("competence"):
        raise ConfigError("curriculum: 'difficulty' follows timeline.competence, which is not declared")
    order = row_order(params.scorer, params.domain_order, packed, tokenizer, seed=seed, key="curriculum")
    if params.direction == "hard_first":  # anti-curriculum: the hardest rows are the "easy" end
        order = order[::-1]  # a view: an order on disk stays there
    layout = dict(seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum, world_size=world_size,
                  rank=rank)
    if params.mode == "weight":  # (hard_first: the reversed order ranks the hardest row 0, i.e. 1 - difficulty)
        return WeightedDifficultySampler(difficulty_of(order), timeline, **layout)
    return PacedDifficultySampler(order, timeline, **layout)
