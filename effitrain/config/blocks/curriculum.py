"""Curriculum block: the stateful sampler that orders training sequences (resumable to the exact batch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


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


@dataclass
class _RowScoreSource:
    """Where a row's score comes from: exactly one of ``scorer`` (a target-free selection scorer run on the rows'
    text; default ``{name: perplexity}``: a pool proxy's loss) and ``domain_order`` (domains, lowest score first)."""
    scorer: Optional[dict[str, Any]] = param(None, help="selection scorer block run on the rows, e.g. {name: "
                                                        "perplexity, proxy_steps: 400}; null = perplexity.  Each "
                                                        "row is scored whole: a null or unset max_length covers "
                                                        "the longest row")
    domain_order: Optional[list[str]] = param(None, help="declared difficulty: every training domain, easiest "
                                                         "(lowest score) first")

    def validate(self, path: str) -> None:
        from effitrain.registry import REGISTRY

        if self.scorer is not None and self.domain_order:
            raise ConfigError(f"{path}: set one of {path}.scorer and {path}.domain_order, not both")
        if not self.domain_order:
            scorer = dict(self.scorer or {"name": "perplexity"})
            # max_length: null = the whole row, resolved from the rows (effitrain.curriculum.row_scores)
            checked = {k: v for k, v in scorer.items() if not (k == "max_length" and v is None)}
            block = REGISTRY.parse("scorer", checked, f"{path}.scorer")
            if getattr(block.params, "NEEDS_TARGET", False):
                raise ConfigError(f"{path}.scorer.name: scorer '{block.name}' needs target data, which a curriculum "
                                  f"does not declare; use a scorer without a target (e.g. perplexity)")
            self.scorer = scorer

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        return [(f"{path}.domain_order", d) for d in self.domain_order or []]


@register("curriculum", "difficulty", builder="effitrain.curriculum.difficulty:build_difficulty",
          summary="Rows by difficulty (proxy-model loss or a domain order), paced by timeline.competence: sampled "
                  "from the easiest share, or all rows with hard ones down-weighted early")
@dataclass
class DifficultyParams(_RowScoreSource):
    direction: Literal["easy_first", "hard_first"] = param("easy_first", help="hard_first = anti-curriculum")
    mode: Literal["sample", "weight"] = param(
        "sample", help="sample: draw from the easiest c(s) share (Platanios 2019); weight: all rows, weight "
                       "1 - d(1 - c(s)) through objective=weighted_causal_lm (MacAvaney 2020)")


@register("curriculum", "scored_order", builder="effitrain.curriculum.scored_order:build_scored_order",
          summary="Rows sorted by a score (e.g. ascending quality), the same order every epoch")
@dataclass
class ScoredOrderParams(_RowScoreSource):
    order: Literal["ascending", "descending"] = param("ascending", help="ascending = lowest score first")
    fit_to_run: bool = param(True, help="sort a random subset of max_steps x global batch rows, so the run ends on "
                                        "the top of the order; false = all rows (a short run never reaches the top)")


@rule("difficulty_weight_needs_weighted_objective",
      "curriculum=difficulty with mode=weight sets example weights: objective=weighted_causal_lm must read them")
def _difficulty_weights_read(spec, env) -> Optional[str]:
    curriculum = spec.blocks["curriculum"]
    if curriculum.name == "difficulty" and curriculum.params.mode == "weight" and \
            spec.blocks["objective"].name != "weighted_causal_lm":
        return (f"curriculum.mode: 'weight' sets batch['example_weights'], but objective="
                f"{spec.blocks['objective'].name} ignores them; use objective=weighted_causal_lm or "
                f"curriculum.mode=sample")
    if curriculum.name == "difficulty" and curriculum.params.mode == "weight" and spec.timeline.declares("seq_len"):
        return ("curriculum.mode: 'weight' gives one weight per packed row, but timeline.seq_len cuts rows into "
                "pieces; drop timeline.seq_len or use curriculum.mode=sample")
    return None
