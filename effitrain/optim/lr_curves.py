"""Learning-rate multipliers of the peak lr as plain functions of the optimizer step, torch-free.

``effitrain plan`` evaluates them without importing torch; :mod:`effitrain.optim.schedules` wraps them in a
``LambdaLR``.  Each is a small picklable dataclass, so DeepSpeed checkpoints its fields and a resumed run continues
on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _warmup(step: int, warmup_steps: int, start: float = 0.0) -> float:
    # step + 1 so the first optimizer step already uses a non-zero lr
    return start + (1.0 - start) * min(1.0, (step + 1) / warmup_steps)


@dataclass
class Constant:
    warmup_steps: int

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps) if step < self.warmup_steps else 1.0

    def breakpoints(self) -> list[int]:
        """Steps where the curve changes form (shown by ``effitrain plan``)."""
        return [self.warmup_steps]


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

    def breakpoints(self) -> list[int]:
        return [self.warmup_steps]


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

    def breakpoints(self) -> list[int]:
        return [self.warmup_steps, self.max_steps - self.decay_steps]


@dataclass
class TimelineLR:
    """``scheduler: timeline``: the ``lr`` quantity of the run's timeline, as ``(step, multiplier)`` breakpoints
    (plain data, so the scheduler's checkpoint holds the curve it followed)."""
    points: tuple
    interpolate: str
    max_steps: int

    def __call__(self, step: int) -> float:
        i = 0
        while i + 1 < len(self.points) and self.points[i + 1][0] <= step:
            i += 1
        at, value = self.points[i]
        if self.interpolate == "linear" and i + 1 < len(self.points):
            nxt, nvalue = self.points[i + 1]
            return value + (nvalue - value) * (step - at) / (nxt - at)
        return value

    def breakpoints(self) -> list[int]:
        return [s for s, _ in self.points]

    @classmethod
    def from_timeline(cls, timeline) -> "TimelineLR":
        return cls(tuple(tuple(p) for p in timeline.points["lr"]), timeline.interpolate["lr"], timeline.max_steps)
