"""Scheduler block: the learning-rate schedule as a multiplier of ``optimizer.lr`` over optimizer steps.

Each params class gives its curve with ``multiplier(max_steps, timeline)`` (torch-free, from
:mod:`effitrain.optim.lr_curves`), so ``effitrain plan`` draws the lr without torch and the one builder,
``effitrain.optim.schedules:build``, wraps it in a ``LambdaLR``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from effitrain.registry import ConfigError, param, register


@dataclass
class _Warmup:
    warmup_steps: int = param(20, ge=0)
    min_lr_ratio: float = param(0.1, ge=0, le=1, help="final lr as a fraction of the peak")


@register("scheduler", "constant", builder="effitrain.optim.schedules:build",
          summary="Linear warmup, then constant")
@dataclass
class ConstantParams:
    warmup_steps: int = param(0, ge=0)

    def multiplier(self, max_steps: int, timeline=None):
        from effitrain.optim.lr_curves import Constant
        return Constant(self.warmup_steps)


@register("scheduler", "cosine", builder="effitrain.optim.schedules:build",
          summary="Linear warmup, cosine decay to min_lr_ratio (the usual pre-training baseline)")
@dataclass
class CosineParams(_Warmup):
    def multiplier(self, max_steps: int, timeline=None):
        from effitrain.optim.lr_curves import Cosine
        return Cosine(self.warmup_steps, max_steps, self.min_lr_ratio)


@register("scheduler", "wsd", builder="effitrain.optim.schedules:build",
          summary="Warmup-stable-decay (MiniCPM, 2404.06395): constant peak, short decay at the end")
@dataclass
class WSDParams(_Warmup):
    decay_fraction: float = param(0.1, gt=0, le=1, help="share of max_steps spent decaying")
    decay_shape: Literal["linear", "cosine", "exp", "sqrt"] = param("exp", help="MiniCPM uses exponential decay")

    def multiplier(self, max_steps: int, timeline=None):
        from effitrain.optim.lr_curves import WarmupStableDecay
        decay_steps = max(1, round(self.decay_fraction * max_steps))
        return WarmupStableDecay(self.warmup_steps, max_steps, self.min_lr_ratio, decay_steps, self.decay_shape)


@register("scheduler", "rewarm_cosine", builder="effitrain.optim.schedules:build",
          summary="Continual pre-training: re-warm from start_lr_ratio to the peak, then cosine re-decay "
                  "(Gupta et al., 2308.04014; Ibrahim et al., 2403.08763)")
@dataclass
class RewarmCosineParams(_Warmup):
    start_lr_ratio: float = param(0.0, ge=0, le=1, help="lr at step 0, as a fraction of the peak")

    def validate(self, path: str) -> None:
        if self.warmup_steps == 0 and self.start_lr_ratio < 1:
            raise ConfigError(f"{path}.warmup_steps: re-warming needs warmup_steps > 0 (or start_lr_ratio: 1)")

    def multiplier(self, max_steps: int, timeline=None):
        from effitrain.optim.lr_curves import Cosine
        return Cosine(self.warmup_steps, max_steps, self.min_lr_ratio, self.start_lr_ratio)


@register("scheduler", "timeline", builder="effitrain.optim.schedules:build",
          summary="The lr multiplier declared in timeline.lr (piecewise in steps, tokens or fraction of the run)")
@dataclass
class TimelineParams:
    def multiplier(self, max_steps: int, timeline=None):
        from effitrain.optim.lr_curves import TimelineLR
        if timeline is None or not timeline.declares("lr"):
            raise ConfigError("scheduler: 'timeline' follows timeline.lr, which is not declared")
        return TimelineLR.from_timeline(timeline)
