"""Self-guided training (Wei et al., 2406.16450) as an engine method: ``methods: {self_guided: {...}}``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from effitrain.registry import param, register


@register("method", "self_guided", builder="effitrain.models.structured_ffn:build_self_guided",
          summary="Self-guided training: decay structured_ffn's dense guide from 1 to 0 over the first part of "
                  "training")
@dataclass
class SelfGuidedParams:
    steps_ratio: float = param(0.5, gt=0, le=1, help="share of train.max_steps over which alpha decays to 0 (the "
                                                     "authors' max_step_ratio: 0.5)")
    schedule: Literal["cosine", "linear"] = param("cosine", help="decay of alpha (authors' default: cosine)")
    reduce_flop: bool = param(True, help="each layer mixes its guide in a micro-batch only with probability alpha "
                                         "(the authors' scripts), halving the guide's expected cost")
    draw_every: Literal["micro_batch", "step"] = param(
        "micro_batch", help="reduce_flop: a new draw for every micro-batch (the authors' forward pass draws it) or "
                            "one for all micro-batches of an optimizer step")
    seed: int = param(0, help="seed of the reduce_flop draws")
