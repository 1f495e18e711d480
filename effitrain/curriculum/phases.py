"""``curriculum: domain_phases``: during a named timeline phase every step's rows come only from that phase's
domains; outside the listed phases, from all the other domains, uniformly shuffled (as ``curriculum: shuffle``
orders them: each row once per pass, a fresh permutation per pass).

Declared as ``curriculum.phases: {PHASE: [DOMAIN, ...]}`` over ``timeline.phases``; e.g. procedural pre-pretraining
is ``phases: {procedural: [procedural]}`` with ``timeline.phases.intervals.procedural: [0, share]``: the first
``share`` of the steps on generated formal-language data, then the corpus without it.  Unlike ``curriculum:
mixture`` with weights 1 then 0, the corpus part needs no declared weights: it keeps the data's own proportions,
exactly like the shuffled baseline.

Which stream a step uses is ``timeline.phase(step)``, a pure function of the step, and each stream is a
:class:`effitrain.curriculum.streams.StepStreamSampler` stream, so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from effitrain.curriculum.streams import StepStreamSampler
from effitrain.registry import ConfigError, choices_text

REST = "<rest>"  # the stream of the rows outside every listed phase's domains


class DomainPhaseSampler(StepStreamSampler):
    stream_kind = "phase stream"

    def __init__(self, domains: np.ndarray, phases: dict[str, list[str]], timeline: Any, *, seed: int,
                 micro_batch_size: int, grad_accum: int, world_size: int, rank: int) -> None:
        domains = np.asarray(domains)
        labels = np.full(len(domains), REST, dtype=object)
        for phase, names in phases.items():
            labels[np.isin(domains, names)] = phase
        super().__init__(labels.astype(str), seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                         world_size=world_size, rank=rank)
        self.timeline = timeline
        self.phase_domains = {p: list(d) for p, d in phases.items()}
        for stream in [*phases, REST]:
            if stream not in self.names:
                what = (f"phase '{stream}' has no rows of its domains {choices_text(phases[stream])}"
                        if stream != REST else "no rows are left outside the phases' domains")
                raise ConfigError(f"curriculum.phases: {what}; the training data's domains: "
                                  f"{choices_text(sorted(set(domains.tolist())))}")

    def stream_of_step(self, step: int) -> int:
        phase = self.timeline.phase(step) if self.timeline is not None else None
        return self.names.index(phase if phase in self.phase_domains else REST)


def build_domain_phases(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                        world_size: int, rank: int, timeline: Optional[Any] = None) -> DomainPhaseSampler:
    from effitrain.data.packing import domain_array

    declared = {name for name, _, _ in timeline.phases} if timeline is not None else set()
    for phase in params.phases:
        if phase not in declared:
            raise ConfigError(f"curriculum.phases.{phase}: timeline.phases declares no interval '{phase}'; "
                              f"declared: {choices_text(sorted(declared)) or 'none'}")
    return DomainPhaseSampler(domain_array(packed), dict(params.phases), timeline, seed=seed,
                              micro_batch_size=micro_batch_size, grad_accum=grad_accum, world_size=world_size,
                              rank=rank)
