"""Checkpoint averaging (``methods: {checkpoint_average: {...}}``): the final model is a weighted average of the
last snapshots (effitrain.methods.checkpoint_average)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("method", "checkpoint_average", builder="effitrain.methods.checkpoint_average:build_checkpoint_average",
          summary="Final model = weighted average (ema/sma/wma) of the last `count` snapshots, `every` steps apart")
@dataclass
class CheckpointAverageParams:
    count: int = param(6, ge=1, help="snapshots averaged, the last at train.max_steps")
    every: Optional[int] = param(None, ge=1, help="optimizer steps between snapshots; null = from `window`")
    window: float = param(0.1, gt=0, le=1, help="share of train.max_steps the snapshots span when every is null")
    weighting: Literal["ema", "sma", "wma"] = param("ema", help="ema: newest weighs alpha; sma: equal; wma: "
                                                               "linear in recency")
    alpha: float = param(0.2, gt=0, le=1, help="ema weight of each new snapshot")


@rule("checkpoint_average_whole_weights", "methods.checkpoint_average reads and writes whole parameters: ZeRO "
                                          "stage 3's partitioned weights are refused")
def _average_zero3(spec, env) -> Optional[str]:
    if any(b.name == "checkpoint_average" for b in spec.methods.values()) and \
            spec.block("parallelism").params.stage == 3:
        return ("methods.checkpoint_average averages whole parameters, which ZeRO-3 partitions over the ranks; use "
                "parallelism with ZeRO <= 2")
    return None
