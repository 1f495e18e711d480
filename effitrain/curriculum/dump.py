"""``curriculum: dump``: prompts drawn by data distribution with UCB over their recent mean absolute advantage.

DUMP (Wang et al. 2025, arXiv 2504.09710; the authors' ``verl/utils/curriculum_learning.py`` in ZhentingWang/DUMP)
treats the distributions of an RL prompt set (its domains: sources, difficulties) as the arms of a bandit.  The
learnability of distribution ``j`` is the mean absolute advantage of its recently sampled completions: with GRPO's
group-normalised advantages, a distribution the policy always or never solves gives ``|A| = 0`` (nothing left to
learn there), one it solves sometimes gives large ``|A|``.  After every optimizer step, as the authors' trainer::

    L_j   = mean |A| over the last `window` completions of distribution j        (0 while j has none)
    UCB_j = L_j + exploration * sqrt(2 ln(N + 1) / (n_j + 1))      n_j completions of j so far, N = max(1, sum n_j)
    p     = softmax(UCB / temperature)

and the next step's prompts are drawn from ``p``.  The authors sample (a softmax with temperature 0.1), they do not
take the argmax, and start from uniform weights before the first update.  A distribution not yet seen has the
largest exploration term by far (``sqrt(2 ln(N+1))`` against ``sqrt(2 ln(N+1) / (n_j+1))``), so it is tried next.

How it plugs in: the rows are drawn by the ``curriculum: mixture`` sampler (each slot's distribution an independent
draw from ``default_rng([seed, step])``, one permutation stream per distribution, so the draws are a function of
the seed, the step and the weights), reading its weights from a :class:`~effitrain.curriculum.skill_it.LiveMixture`
that :class:`DumpHook` sets.  ``grpo`` publishes every completion's advantage as ``batch["completion_advantages"]``
(``[B * G]``, the G completions of a prompt together); the sampler tells the hook which rows each micro-batch holds,
so the hook knows each completion's distribution.  At ``step_end`` (all ranks' completions gathered, so every rank
computes the same weights) the windows and counts are updated and the weights recomputed; the loop draws the next
step's rows after ``step_end``, and the checkpoint written at that step holds the new weights.  A ``grpo`` step that
reuses its cycle's samples (``iterations`` > 1) trains on no new rows: nothing is recorded.

Resuming: the hook's state (windows, counts, weights, updates) goes into every checkpoint under ``dump``; the
sampler's state is the mixture sampler's (step, micro-batch, each stream's position); the draws need no RNG state of
their own.  A resumed run therefore draws exactly the rows, and trains on exactly the batches, of the uninterrupted
run.  Each step's weights are logged as ``dump/p/DOMAIN`` and the windows' means as ``dump/adv/DOMAIN``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Sequence

import numpy as np

from effitrain.curriculum.mixture import MixtureSampler
from effitrain.curriculum.skill_it import LiveMixture
from effitrain.engine.events import Hook
from effitrain.errors import RunFailed
from effitrain.registry import ConfigError, choices_text

#: the batch key ``grpo`` fills with the completions' advantages; the same name as
#: ``effitrain.objectives.common.COMPLETION_ADVANTAGES`` (not imported: that module imports torch)
COMPLETION_ADVANTAGES = "completion_advantages"


def ucb_scores(mean_abs_advantage: np.ndarray, counts: np.ndarray, exploration: float) -> np.ndarray:
    """The authors' UCB score of every distribution: the window's mean ``|A|`` plus the exploration bonus
    ``exploration * sqrt(2 ln(N + 1) / (n_j + 1))`` with ``N = max(1, sum n)``."""
    total = max(1.0, float(np.sum(counts)))
    return mean_abs_advantage + exploration * np.sqrt(2.0 * np.log(total + 1.0) / (np.asarray(counts) + 1.0))


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = (scores - scores.max()) / temperature  # shifted by the maximum: the same distribution, no overflow
    weights = np.exp(z)
    return weights / weights.sum()


class DumpHook(Hook):
    name = "dump"

    def __init__(self, names: Sequence[str], mixture: LiveMixture, row_domains: np.ndarray, *, window: int,
                 exploration: float, temperature: float) -> None:
        self.names = list(names)
        self.mixture = mixture
        self.row_domains = row_domains  # the distribution index of every packed row
        self.window, self.exploration, self.temperature = window, exploration, temperature
        self.recent: list[deque] = [deque(maxlen=window) for _ in self.names]  # |A| of recent completions
        self.counts = np.zeros(len(self.names), dtype=np.int64)               # completions seen, all time
        self.updates = 0
        self._pending: Optional[list[int]] = None        # the rows of the micro-batch just handed out
        self._step: list[tuple[int, float]] = []          # (distribution, |A|) of this step's completions, this rank
        mixture.current = {d: 1.0 / len(self.names) for d in self.names}  # the authors' start: uniform

    # -- what the sampler and the objective tell it ---------------------------------------------------------
    def expect(self, rows: list[int]) -> None:
        self._pending = list(rows)

    def on_after_forward(self, state: Any) -> None:
        rows, self._pending = self._pending, None
        advantages = state.batch.get(COMPLETION_ADVANTAGES) if state.batch is not None else None
        if advantages is None:
            if state.spec.block("objective").name == "grpo":
                return  # a grpo step reusing its cycle's samples (iterations > 1): these rows were not sampled
            raise RunFailed(f"curriculum=dump: the objective publishes no batch['{COMPLETION_ADVANTAGES}']; DUMP "
                            f"scores distributions by the advantages of sampled completions, use objective=grpo")
        if rows is None:
            raise RunFailed("curriculum=dump: a micro-batch arrived that the curriculum did not hand out")
        values = np.abs(advantages.detach().float().cpu().numpy().reshape(-1))
        if len(values) % len(rows):
            raise RunFailed(f"curriculum=dump: {len(values)} completion advantages for a micro-batch of {len(rows)} "
                            f"prompts")
        group = len(values) // len(rows)
        domains = np.repeat(self.row_domains[np.asarray(rows)], group)  # completions are grouped by prompt
        self._step += list(zip(domains.tolist(), values.tolist()))

    def on_step_end(self, state: Any) -> None:
        observed = _gathered(self._step, state.world_size)
        self._step = []
        if not observed:
            return  # a reused-samples step: the weights stay
        self.observe(observed)
        state.metrics.update({f"dump/p/{d}": w for d, w in self.mixture.current.items()})
        state.metrics.update({f"dump/adv/{d}": float(np.mean(r)) if r else 0.0
                              for d, r in zip(self.names, self.recent)})

    # -- the update -----------------------------------------------------------------------------------------
    def observe(self, observed: list[tuple[int, float]]) -> np.ndarray:
        """Add one step's ``(distribution, |A|)`` pairs to the windows and counts; recompute the weights."""
        for k, value in observed:
            self.recent[k].append(float(value))
            self.counts[k] += 1
        self.mixture.current = dict(zip(self.names, self.weights().tolist()))
        self.updates += 1
        return self.weights()

    def mean_abs_advantage(self) -> np.ndarray:
        return np.array([float(np.mean(r)) if r else 0.0 for r in self.recent])

    def weights(self) -> np.ndarray:
        if self.updates == 0 and not self.counts.any():
            return np.full(len(self.names), 1.0 / len(self.names))
        return softmax(ucb_scores(self.mean_abs_advantage(), self.counts, self.exploration), self.temperature)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "recent": [list(r) for r in self.recent], "counts": self.counts.tolist(),
                "weights": dict(self.mixture.current), "updates": self.updates, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(f"resume: the checkpoint's DUMP statistics are over distributions "
                              f"{choices_text(state['names'])}, this run's data has {choices_text(self.names)}")
        self.recent = [deque(map(float, r), maxlen=self.window) for r in state["recent"]]
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        self.mixture.current = {d: float(state["weights"][d]) for d in self.names}
        self.updates = int(state["updates"])


def _gathered(pairs: list[tuple[int, float]], world_size: int) -> list[tuple[int, float]]:
    """Every rank's pairs of this step, in rank order (the same list on every rank)."""
    if world_size == 1:
        return pairs
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return pairs
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, pairs)
    return [pair for part in parts for pair in part]


class DumpSampler(MixtureSampler):
    """The mixture sampler drawing with the weights the DUMP hook sets, telling it which rows it hands out."""

    def __init__(self, domains: np.ndarray, *, window: int, exploration: float, temperature: float,
                 **layout: Any) -> None:
        labels = np.asarray(domains)
        names = sorted(set(labels.tolist()))
        if len(names) < 2:
            raise ConfigError(f"curriculum: 'dump' chooses between data distributions, but the training prompts have "
                              f"one domain ({choices_text(names)}); split them (dataset=chat_demo: "
                              f"dataset.domain_by=operation, digits or operation_digits)")
        mixture = LiveMixture({d: 1.0 / len(names) for d in names})
        super().__init__(labels, mixture, **layout)
        index = {d: k for k, d in enumerate(self.names)}
        self.hook = DumpHook(self.names, mixture, np.array([index[d] for d in labels.tolist()], dtype=np.int64),
                             window=window, exploration=exploration, temperature=temperature)

    def __iter__(self):
        for rows in super().__iter__():
            self.hook.expect(rows)
            yield rows

    def __repr__(self) -> str:
        return (f"DumpSampler(distributions={self.names}, global_batch={self.global_batch_size}, step={self.step}, "
                f"micro={self.micro})")


def build_dump(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
               rank: int) -> DumpSampler:
    """The ``curriculum: dump`` builder; ``packed``'s ``domain`` column gives the distributions."""
    from effitrain.data.packing import domain_array

    return DumpSampler(domain_array(packed), window=params.window, exploration=params.exploration,
                       temperature=params.temperature, seed=seed, micro_batch_size=micro_batch_size,
                       grad_accum=grad_accum, world_size=world_size, rank=rank)
