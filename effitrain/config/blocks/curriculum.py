"""Curriculum block: the stateful sampler that orders training sequences (resumable to the exact batch)."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import register


@register("curriculum", "shuffle", builder="effitrain.curriculum.samplers:build_shuffle",
          summary="Uniform random order, reshuffled each epoch (no curriculum)")
@dataclass
class ShuffleParams:
    pass


@register("curriculum", "sequential", builder="effitrain.curriculum.samplers:build_sequential",
          summary="The packed order of the data, unshuffled")
@dataclass
class SequentialParams:
    pass


@register("curriculum", "mixture", builder="effitrain.curriculum.mixture:build_mixture",
          summary="Each step's rows drawn by domain with the weights of timeline.mixture at that step")
@dataclass
class MixtureParams:
    pass
