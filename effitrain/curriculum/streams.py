"""A reusable base for curricula that take every row of an optimizer step from one *stream* chosen per step.

Rows are labelled with a stream (a domain set, a length bucket, ...).  :meth:`StepStreamSampler.stream_of_step`
(a pure function of the seed and the step, written by the subclass) names the stream all ``G = micro x accum x
world`` rows of a step come from.  The rows of a stream come from that stream's own permutation, fresh each time it
is exhausted, and the slots are laid out like every curriculum's — all of this, and the resumable state (step,
micro-batch, rows drawn per stream), is :class:`effitrain.curriculum.mixture.MixtureSampler`'s, of which a step
stream sampler is the special case "all slots of a step in one domain".  Users: ``curriculum: dataset_decomposition``
(a stream is a length bucket) and ``curriculum: domain_phases`` (a stream is the domains of a timeline phase).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from effitrain.curriculum.mixture import MixtureSampler
from effitrain.curriculum.samplers import StepSlotSampler
from effitrain.registry import ConfigError


class StepStreamSampler(MixtureSampler):
    #: what a stream is, in error messages
    stream_kind = "stream"

    def __init__(self, labels: np.ndarray, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
                 rank: int) -> None:
        StepSlotSampler.__init__(self, len(labels), seed=seed, micro_batch_size=micro_batch_size,
                                 grad_accum=grad_accum, world_size=world_size, rank=rank)
        self._init_streams(labels)   # a mixture sampler without its timeline: the stream of a step is declared

    def stream_of_step(self, step: int) -> int:
        """The index (into :attr:`names`) of the stream that all rows of ``step`` come from."""
        raise NotImplementedError

    def slot_domains(self, step: int) -> np.ndarray:
        return np.full(self.global_batch_size, self.stream_of_step(step), np.int64)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "drawn" not in state or sorted(state["drawn"]) != self.names:
            raise ConfigError(f"resume: the checkpoint's sampler counted other {self.stream_kind}s "
                              f"({sorted(state.get('drawn', {}))}) than this run's ({self.names}); resume with the "
                              f"run's own curriculum and data")
        super().load_state_dict(state)
