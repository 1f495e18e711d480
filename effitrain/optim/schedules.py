"""Learning-rate schedules as multipliers of the peak lr, one step per optimizer step.

Each is a small picklable callable in a ``LambdaLR``, so DeepSpeed checkpoints the scheduler's position and a
resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int, start: float = 0.0) -> float:
    # step + 1 so the first optimizer step already uses a non-zero lr
    return start + (1.0 - start) * min(1.0, (step + 1) / warmup_steps)


@dataclass
class Constant:
    warmup_steps: int

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps) if step < self.warmup_steps else 1.0


@dataclass
class Cosine:
    warmup_steps: int
    max_steps: int
    min_ratio: float
    start_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.start_ratio)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupStableDecay:
    """MiniCPM (arXiv 2404.06395): warmup, a long constant phase, then a short decay to ``min_ratio``."""
    warmup_steps: int
    max_steps: int
    min_ratio: float
    decay_steps: int
    shape: str

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        decay_start = self.max_steps - self.decay_steps
        if step < decay_start:
            return 1.0
        t = min(1.0, (step - decay_start + 1) / self.decay_steps)  # in (0, 1]
        if self.shape == "linear":
            frac = 1.0 - t
        elif self.shape == "cosine":
            frac = 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.shape == "sqrt":
            frac = 1.0 - math.sqrt(t)
        else:  # "exp": geometric interpolation from the peak to min_ratio (MiniCPM's exponential decay)
            floor = max(self.min_ratio, 1e-4)
            return floor ** t
        return self.min_ratio + (1.0 - self.min_ratio) * frac


def build_constant(params, optimizer: torch.optim.Optimizer, *, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, Constant(params.warmup_steps))


def build_cosine(params, optimizer: torch.optim.Optimizer, *, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, Cosine(params.warmup_steps, max_steps, params.min_lr_ratio))


def build_wsd(params, optimizer: torch.optim.Optimizer, *, max_steps: int) -> LambdaLR:
    decay_steps = max(1, round(params.decay_fraction * max_steps))
    return LambdaLR(optimizer, WarmupStableDecay(params.warmup_steps, max_steps, params.min_lr_ratio,
                                                 decay_steps, params.decay_shape))


def build_rewarm_cosine(params, optimizer: torch.optim.Optimizer, *, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, Cosine(params.warmup_steps, max_steps, params.min_lr_ratio, params.start_lr_ratio))


def follow_this_horizon(scheduler: LambdaLR):
    """Call before loading a checkpoint into ``scheduler``; the returned function, called after, keeps the schedule
    that was built for *this* launch's ``train.max_steps`` and says what that changed.

    A ``LambdaLR`` checkpoints its callables' fields, so loading would silently bring back the old horizon (a run
    extended from 40 to 60 steps would spend 20 steps at the floor lr).  The declared rule instead: a resumed run
    follows the schedule of its new horizon from the resumed step on — for WSD the stable phase grows and the
    decay moves to the new end; for cosine the curve is re-stretched, so the lr rises at the resume step — and the
    run prints the lr before and after the change."""
    import copy

    declared = [copy.deepcopy(f) for f in scheduler.lr_lambdas]

    def restore(step: int) -> str:
        restored = scheduler.lr_lambdas
        if all(a == b for a, b in zip(restored, declared)):
            return ""
        before = restored[0](scheduler.last_epoch)
        scheduler.lr_lambdas = declared
        after = declared[0](scheduler.last_epoch)
        for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, declared):
            group["lr"] = base * fn(scheduler.last_epoch)
        old = getattr(restored[0], "max_steps", None)
        new = getattr(declared[0], "max_steps", None)
        span = f"from {old} to {new} steps" if old != new else "to this launch's settings"
        peak = scheduler.base_lrs[0]
        return (f"the {type(declared[0]).__name__} schedule now spans {span}; at step {step} the lr goes from "
                f"{before * peak:.3g} to {after * peak:.3g}")

    return restore
