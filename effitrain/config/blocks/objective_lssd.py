"""``objective: lssd``: logit-swap self-distillation (Mix-CPT, Jiang et al., 2407.10804), the format-alignment loss
that teaches the gold token to be the model's first choice while keeping the rest of the model's own distribution
(:mod:`effitrain.objectives.lssd`).  A normal registered objective: a stage names it like ``sft``, and a stage
that mixes objectives can name it as a component."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import register


@register("objective", "lssd", builder="effitrain.objectives.lssd:build",
          summary="Logit-swap self-distillation: KL to the model's own distribution with the gold token's logit "
                  "swapped with the top logit, on the assistant tokens (Mix-CPT, 2407.10804)")
@dataclass
class LSSDParams:
    pass
