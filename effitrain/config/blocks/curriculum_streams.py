"""Curriculum blocks that take every row of a step from one stream (effitrain/curriculum/streams.py): length buckets
(dataset_decomposition) and timeline phases (domain_phases), with the rule that ties them to their data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@register("curriculum", "dataset_decomposition", builder="effitrain.curriculum.decomposition:build_decomposition",
          summary="Dataset decomposition: one length bucket per step (constant tokens), short buckets early in "
                  "every cycle (needs dataset.packing=decompose)")
@dataclass
class DecompositionParams:
    cycles: int = param(8, ge=1, help="the run is split into this many cycles; each sees the buckets in the "
                                      "data's proportions, short first")
    odds_base: float = param(2.0, gt=0, help="odds of the i-th shortest of n buckets = odds_base**(n-1-i); "
                                             "2 = the authors' pow-2 curriculum, 1 = no curriculum")


@register("curriculum", "domain_phases", builder="effitrain.curriculum.phases:build_domain_phases",
          summary="During a timeline phase, rows only from that phase's domains; otherwise the other domains "
                  "shuffled")
@dataclass
class DomainPhasesParams:
    phases: dict[str, list[str]] = param(default_factory=dict,
                                         help="{PHASE: [DOMAIN, ...]} over timeline.phases")

    def validate(self, path: str) -> None:
        if not self.phases:
            raise ConfigError(f"{path}.phases: name at least one timeline phase and its domains, e.g. "
                              f"{{procedural: [procedural]}}")
        seen: set[str] = set()
        for phase, domains in self.phases.items():
            if not domains:
                raise ConfigError(f"{path}.phases.{phase}: an empty list of domains")
            twice = seen & set(domains)
            if twice:
                raise ConfigError(f"{path}.phases.{phase}: domain '{sorted(twice)[0]}' is already in another phase")
            seen |= set(domains)

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        return [(f"{path}.phases.{phase}", d) for phase, domains in self.phases.items() for d in domains]


@rule("curriculum_reads_its_data",
      "curriculum dataset_decomposition needs dataset.packing=decompose (and the reverse) and sets the sequence "
      "length itself (no timeline.seq_len); domain_phases names phases that timeline.phases declares")
def _curriculum_reads_its_data(spec, env) -> Optional[str]:
    curriculum = spec.blocks["curriculum"]
    packing = getattr(spec.blocks["dataset"].params, "packing", "concatenate")
    timeline = getattr(spec, "timeline", None)
    if curriculum.name == "dataset_decomposition":
        if packing != "decompose":
            return ("curriculum: dataset_decomposition draws length buckets, which only dataset.packing=decompose "
                    "makes; set dataset.packing=decompose")
        if timeline is not None and timeline.declares("seq_len"):
            return ("timeline.seq_len: dataset_decomposition sets the sequence length of every step itself; remove "
                    "timeline.seq_len")
    elif packing == "decompose":
        return (f"dataset.packing: decompose stores pieces of several documents side by side in a row; only "
                f"curriculum=dataset_decomposition cuts them apart (curriculum is {curriculum.name})")
    if curriculum.name == "domain_phases":
        declared = {name for name, _, _ in timeline.phases.intervals} if timeline and timeline.phases else set()
        for phase in curriculum.params.phases:
            if phase not in declared:
                return (f"curriculum.phases.{phase}: timeline.phases declares no interval '{phase}'; declared: "
                        f"{', '.join(sorted(declared)) or 'none'}")
    return None
