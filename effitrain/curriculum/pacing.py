"""Pacing functions: the competence ``c(t)`` in (0, 1] of a curriculum, the share of the difficulty-sorted rows a
step may draw from (torch-free; the timeline turns a declared pacing into ``timeline.competence`` breakpoints).

``t`` is the fraction of the pacing's duration ``T`` that has passed (``t = step / T``, clipped to 1).

* ``linear`` — Platanios et al. 2019 (competence-based curriculum, eq. 6): ``c(t) = min(1, c0 + (1 - c0) t)``.
* ``root`` — Platanios et al. 2019 (eq. 7, p = 2): ``c(t) = min(1, sqrt(c0^2 + (1 - c0^2) t))``: new rows arrive
  fast at first, when each of them is a large share of what the model has seen.
* ``step`` — Hacohen & Weinshall 2019 ("fixed exponential pacing"): ``c = min(1, c0 * increase^floor(step /
  step_length))``; here ``step_length`` is a fraction of ``T`` and ``increase`` the factor per jump.

Anyone can reuse these (a length curriculum, a growing data window): :func:`competence` is the whole contract.
"""

from __future__ import annotations

import math

FUNCTIONS = ("linear", "root", "step")


def competence(function: str, t: float, *, start: float, increase: float = 2.0, step_length: float = 0.1) -> float:
    """``c(t)`` for ``t`` in [0, 1] (fraction of the pacing's duration); ``start`` = ``c0`` in (0, 1]."""
    t = min(max(t, 0.0), 1.0)
    if function == "linear":
        return min(1.0, start + (1.0 - start) * t)
    if function == "root":
        return min(1.0, math.sqrt(start * start + (1.0 - start * start) * t))
    if function == "step":
        if t >= 1.0:
            return 1.0
        return min(1.0, start * increase ** math.floor(t / step_length + 1e-9))
    raise ValueError(f"unknown pacing function {function!r}; valid: {', '.join(FUNCTIONS)}")


def breakpoints(function: str, *, start: float, until: float, increase: float = 2.0, step_length: float = 0.1,
                samples: int = 24) -> list[tuple[float, float]]:
    """The pacing as ``(at, competence)`` points with ``at`` a fraction of the run and the pacing ending at
    ``until``: exact for ``step`` (its jumps) and ``linear`` (its two ends, drawn with linear interpolation);
    ``root`` is sampled at ``samples`` points denser near 0 (where it bends), to be linearly interpolated — the
    largest error of that chord approximation is below 1% of the rows for the default 24 samples and ``c0 >= 0.01``.
    """
    if function == "linear":
        return [(0.0, start), (until, 1.0)]
    if function == "step":
        points, k = [(0.0, start)], 1
        while True:
            at = k * step_length * until
            value = competence("step", k * step_length, start=start, increase=increase, step_length=step_length)
            if at >= until - 1e-12 or value >= 1.0:
                points.append((min(at, until), 1.0))
                return points
            points.append((at, value))
            k += 1
    if function == "root":
        # sample uniformly in c (not in t): c is what bends, so equal steps of c keep each chord short
        c_values = [start + (1.0 - start) * i / (samples - 1) for i in range(samples)]
        ts = [(c * c - start * start) / (1.0 - start * start) if start < 1 else 0.0 for c in c_values]
        return [(t * until, c) for t, c in zip(ts, c_values)]
    raise ValueError(f"unknown pacing function {function!r}; valid: {', '.join(FUNCTIONS)}")
