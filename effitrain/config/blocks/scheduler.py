"""Scheduler block: the learning-rate schedule as a multiplier of ``optimizer.lr`` over optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from effitrain.registry import ConfigError, param, register


@dataclass
class _Warmup:
    warmup_steps: int = param(20, ge=0)
    min_lr_ratio: float = param(0.1, ge=0, le=1, help="final lr as a fraction of the peak")


@register("scheduler", "constant", builder="effitrain.optim.schedules:build_constant",
          summary="Linear warmup, then constant")
@dataclass
class ConstantParams:
    warmup_steps: int = param(0, ge=0)


@register("scheduler", "cosine", builder="effitrain.optim.schedules:build_cosine",
          summary="Linear warmup, cosine decay to min_lr_ratio (the usual pre-training baseline)")
@dataclass
class CosineParams(_Warmup):
    pass


@register("scheduler", "wsd", builder="effitrain.optim.schedules:build_wsd",
          summary="Warmup-stable-decay (MiniCPM, 2404.06395): constant peak, short decay at the end")
@dataclass
class WSDParams(_Warmup):
    decay_fraction: float = param(0.1, gt=0, le=1, help="share of max_steps spent decaying")
    decay_shape: Literal["linear", "cosine", "exp", "sqrt"] = param("exp", help="MiniCPM uses exponential decay")


@register("scheduler", "rewarm_cosine", builder="effitrain.optim.schedules:build_rewarm_cosine",
          summary="Continual pre-training: re-warm from start_lr_ratio to the peak, then cosine re-decay "
                  "(Gupta et al., 2308.04014; Ibrahim et al., 2403.08763)")
@dataclass
class RewarmCosineParams(_Warmup):
    start_lr_ratio: float = param(0.0, ge=0, le=1, help="lr at step 0, as a fraction of the peak")

    def validate(self, path: str) -> None:
        if self.warmup_steps == 0 and self.start_lr_ratio < 1:
            raise ConfigError(f"{path}.warmup_steps: re-warming needs warmup_steps > 0 (or start_lr_ratio: 1)")
