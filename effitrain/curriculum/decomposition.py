"""``curriculum: dataset_decomposition``: variable sequence length with a length curriculum (Pouransari et al. 2024,
arXiv 2405.13226), over the buckets of ``dataset.packing: decompose`` (:mod:`effitrain.data.decompose`).

Each optimizer step trains on one bucket: its ``G`` packed rows of ``seq_len`` tokens are cut back into pieces of
the bucket's length ``l`` by the batch hook (``[B, seq_len] -> [B*seq_len/l, l]``), so every step holds the same
number of tokens (``G * seq_len``) and batch rows = tokens per batch / ``l``, as in the paper.

Which bucket a step trains on — the authors' variable-sequence-length sampling (``open_lm.patch``: ``MyRandomMix``
with ``--source-num-seq-per-epoch`` and ``--train-data-mix-weights`` from ``scripts/get_dd_params.py``):

* training is split into ``cycles`` equal cycles (their "epochs"; 8 in the released 1B example);
* in every cycle each bucket has a quota of steps proportional to its tokens (so a cycle sees the buckets in the
  proportions of the data);
* each step draws a bucket with fixed probabilities proportional to ``quota_i * odds_i`` among the buckets whose
  quota is not used up (an exhausted bucket leaves the draw, the rest renormalise).  ``odds_i = odds_base ** (n-1-i)``
  for the ``i``-th shortest of ``n`` buckets: ``odds_base: 2`` is the released "pow-2" curriculum (odds 32:16:8:4:2:1
  over six buckets), so short sequences come early in every cycle and long ones late; ``odds_base: 1`` is variable
  length without a curriculum.

The draw of cycle ``c`` comes from ``numpy.random.default_rng([seed, 0xDD, c])``: the bucket of any step is a pure
function of the seed, the data's bucket sizes and the step, so every rank agrees and a resumed run continues the
same sequence (the sampler's state is :class:`effitrain.curriculum.streams.StepStreamSampler`'s).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from effitrain.curriculum.streams import StepStreamSampler
from effitrain.engine.events import Hook
from effitrain.registry import ConfigError


def largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Integers proportional to ``shares`` that sum to exactly ``total`` (Hamilton's method; ties to the first)."""
    exact = total * shares / shares.sum()
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


class DecompositionSampler(StepStreamSampler):
    stream_kind = "length bucket"

    def __init__(self, piece_len: np.ndarray, *, max_steps: int, cycles: int, odds_base: float, seed: int,
                 micro_batch_size: int, grad_accum: int, world_size: int, rank: int) -> None:
        piece_len = np.asarray(piece_len, np.int64)
        super().__init__(piece_len, seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                         world_size=world_size, rank=rank)
        self.lengths = np.array(self.names, np.int64)  # ascending: the streams are the buckets, shortest first
        rows = np.array([len(r) for r in self.rows_of], np.float64)
        # a bucket with fewer rows than one global batch would repeat rows inside a batch: it is not drawn
        usable = rows >= self.global_batch_size
        if not usable.any():
            raise ConfigError(f"curriculum: no length bucket has a global batch ({self.global_batch_size}) of rows; "
                              f"rows per bucket length: {dict(zip(self.names, rows.astype(int).tolist()))}")
        self.skipped = [int(n) for n, u in zip(self.names, usable) if not u]
        self.steps_per_cycle = max(1, math.ceil(max_steps / cycles))
        # tokens per bucket are proportional to its rows (every row holds seq_len tokens)
        self._usable_rows = np.where(usable, rows, 0.0)
        self.quota = largest_remainder(self.steps_per_cycle, self._usable_rows)
        n = len(self.names)
        self.odds = float(odds_base) ** np.arange(n - 1, -1, -1, dtype=np.float64)
        self._cycles: dict[int, np.ndarray] = {}

    def cycle_buckets(self, cycle: int) -> np.ndarray:
        """The bucket index of every step of ``cycle``, in order."""
        if cycle not in self._cycles:
            if len(self._cycles) > 2:
                self._cycles.clear()
            rng = np.random.default_rng([self.seed % 2**63, 0xDD, cycle])
            left = self.quota.copy()
            weight = self.quota * self.odds
            out = np.empty(self.steps_per_cycle, np.int64)
            for t in range(self.steps_per_cycle):
                p = np.where(left > 0, weight, 0.0)
                k = int(rng.choice(len(p), p=p / p.sum()))
                out[t] = k
                left[k] -= 1
            self._cycles[cycle] = out
        return self._cycles[cycle]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_per_cycle": self.steps_per_cycle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = int(state.get("steps_per_cycle", self.steps_per_cycle))
        if saved != self.steps_per_cycle:
            # the cycle length follows train.max_steps; a resume that changes it keeps the run's own cycles, so the
            # steps already trained stay the ones it had planned (the run then has more or fewer cycles)
            from effitrain.console import say

            say(f"dataset_decomposition: keeping the checkpoint's cycles of {saved} steps (this launch would have "
                f"made {self.steps_per_cycle})")
            self.steps_per_cycle = saved
            self.quota = largest_remainder(saved, self._usable_rows)
            self._cycles.clear()

    def stream_of_step(self, step: int) -> int:
        return int(self.cycle_buckets(step // self.steps_per_cycle)[step % self.steps_per_cycle])

    def length_of_step(self, step: int) -> int:
        """The sequence length the model trains on at optimizer step ``step``."""
        return int(self.lengths[self.stream_of_step(step)])


class DecompositionHook(Hook):
    """Cuts each micro-batch's packed rows back into the pieces of the step's bucket; logs the length."""
    name = "dataset_decomposition"

    def __init__(self, sampler: DecompositionSampler) -> None:
        self.sampler = sampler

    def on_batch_start(self, state: Any) -> None:
        length = self.sampler.length_of_step(state.step)
        batch = state.batch
        if batch["input_ids"].shape[1] != length:
            state.batch = {k: v.reshape(-1, length) if k in ("input_ids", "labels") else v for k, v in batch.items()}

    def on_step_end(self, state: Any) -> None:
        state.metrics["seq_len"] = self.sampler.length_of_step(state.step - 1)


def build_decomposition(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                        world_size: int, rank: int, timeline: Optional[Any] = None) -> DecompositionSampler:
    """The ``curriculum: dataset_decomposition`` builder; ``packed`` must come from ``dataset.packing: decompose``."""
    from effitrain.console import say
    from effitrain.data.sources import arrow_column

    if "piece_len" not in packed.column_names:
        raise ConfigError("curriculum: 'dataset_decomposition' draws length buckets, which only "
                          "dataset.packing=decompose makes; set dataset.packing=decompose")
    if timeline is not None and timeline.declares("seq_len"):
        raise ConfigError("timeline.seq_len: dataset_decomposition sets the sequence length of every step itself; "
                          "remove timeline.seq_len")
    # token shards (data.executor) keep the column as an array of their own; a datasets table as an arrow column
    piece_len = packed.piece_len() if callable(getattr(packed, "piece_len", None)) else \
        arrow_column(packed, "piece_len").to_numpy(zero_copy_only=False)
    sampler = DecompositionSampler(piece_len, max_steps=timeline.max_steps if timeline is not None else 1,
                                   cycles=params.cycles, odds_base=params.odds_base, seed=seed,
                                   micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                   world_size=world_size, rank=rank)
    if sampler.skipped:
        say(f"dataset_decomposition: bucket(s) of length {sampler.skipped} hold fewer rows than one global batch "
            f"and are not drawn")
    sampler.hook = DecompositionHook(sampler)
    return sampler
