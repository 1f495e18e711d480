"""Dynamic loss-based sample reweighting (``methods: {loss_reweighting: {...}}``; Sow et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("method", "loss_reweighting", builder="effitrain.methods.loss_reweighting:build_loss_reweighting",
          summary="Per-example weights from the current loss (LinUpper / Quadratic / Extremes), through "
                  "objective weighted_causal_lm (Sow et al., 2502.06733)")
@dataclass
class LossReweightingParams:
    strategy: Literal["linupper", "quadratic", "extremes"] = param(
        "linupper", help="weighting function of the normalised loss h: linupper min(h+delta, delta) (down-weights "
                         "the easiest), quadratic 1-h^2/delta^2 (down-weights both ends), extremes |h| (up-weights "
                         "both ends)")
    r: float = param(1.0, gt=0, help="temperature of w ∝ exp(f/r) (the authors' kl_reg: 1.0; 0.4 in their larger "
                                     "extremes runs); large r = nearly uniform")
    delta: float = param(1.0, gt=0, help="losses are normalised to [-delta, delta] (the authors use 1)")
    warmup_fraction: float = param(0.05, ge=0, lt=1, help="share of train.max_steps trained without reweighting "
                                                          "(the authors' burnout_steps: 1,000 of 20,000)")


@rule("loss_reweighting_needs_weighted_objective",
      "methods.loss_reweighting supplies per-example weights: objective must be weighted_causal_lm")
def _needs_weighted_objective(spec, env) -> Optional[str]:
    if any(b.name == "loss_reweighting" for b in spec.methods.values()) and \
            spec.block("objective").name != "weighted_causal_lm":
        return (f"methods.loss_reweighting sets per-example weights that objective "
                f"'{spec.block('objective').name}' ignores; use objective=weighted_causal_lm")
    return None
