"""The CMR scaling law (Gu, Yang, Ding, Zhao and Tan 2024, "CMR Scaling Law: Predicting Critical Mixture Ratios for
Continual Pre-training of Language Models", 2407.17467, EMNLP 2024).

Continual pre-training mixes domain data (ratio ``R``) with replayed general data (``1 - R``).  For each ratio the
paper fits the change of the validation losses from the start of continual training as power laws of the tokens
trained ``T`` (its Eq. 6): the domain loss with one term, the general loss with two (it first rises, then falls)::

    dL_dom(T) = a1 * T**s1 + b1
    dL_gen(T) = a2 * T**s2 + a3 * T**s3 + b2

A ratio is *feasible* when the general loss stays within ``tolerance`` of where it started (paper: 0.05) after the
token budget; the *critical mixture ratio* (CMR) is the largest feasible ratio: the most domain data the budget can
take without losing general ability.  Across budgets the CMR itself follows a power law (Eq. 8)::

    R_cmr(T) = a4 * T**s4 + b3

Pure numpy/scipy:

1. :func:`fit_power_law` — Eq. 6's one- or two-term law to one ratio's curve (least squares from several starts);
2. :func:`critical_ratio` — the largest ratio whose (predicted) general-loss change at a budget is within the
   tolerance, between swept ratios by linear interpolation of that change (the ratios are swept, the CMR is not);
3. :func:`fit_cmr_law` — Eq. 8 to the CMR at several budgets, to predict it at a larger one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    """``sum_k a_k * T**s_k + b`` (one term: Eq. 6's domain law and Eq. 8; two: Eq. 6's general law)."""
    coefficients: tuple[float, ...]
    exponents: tuple[float, ...]
    offset: float

    def __call__(self, tokens) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.float64)
        return self.offset + sum(a * np.power(t, s) for a, s in zip(self.coefficients, self.exponents))

    def as_dict(self) -> dict:
        return {"coefficients": [float(a) for a in self.coefficients], "exponents": [float(s) for s in self.exponents],
                "offset": float(self.offset)}


def fit_power_law(tokens: Sequence[float], values: Sequence[float], *, terms: int) -> tuple[PowerLaw, float]:
    """The ``terms``-term power law of ``values`` over ``tokens`` with the least squared error, and its R^2.
    Exponents are kept in [-3, 3] and start from a grid (a sum of powers has many local minima)."""
    from scipy.optimize import least_squares
    from threadpoolctl import threadpool_limits

    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if (t <= 0).any() or len(t) != len(y) or len(t) < 2 * terms + 1:
        raise ValueError(f"cmr_law: a {terms}-term power law needs at least {2 * terms + 1} points at positive "
                         f"token counts, got {len(t)}")

    log_t = np.log(t)

    def residual(p: np.ndarray) -> np.ndarray:
        return PowerLaw(tuple(p[:terms]), tuple(p[terms:2 * terms]), p[-1])(t) - y

    def jacobian(p: np.ndarray) -> np.ndarray:  # d/da_k = T^s_k, d/ds_k = a_k T^s_k ln T, d/db = 1
        powers = [np.power(t, s) for s in p[terms:2 * terms]]
        return np.column_stack([*powers, *(a * pw * log_t for a, pw in zip(p[:terms], powers)), np.ones_like(t)])

    spread = float(np.ptp(y)) or 1.0
    exponent_starts = [-1.0, -0.3, 0.3, 1.0] if terms == 1 else [(-1.0, 0.3), (-0.5, 0.5), (-2.0, 1.0)]
    bounds = ([-np.inf] * terms + [-3.0] * terms + [-np.inf], [np.inf] * terms + [3.0] * terms + [np.inf])
    best = None
    # threads only contend for these tiny problems on a busy machine (as in anneal_law)
    with threadpool_limits(1):
        for exps, sign in itertools.product(exponent_starts, (1.0, -1.0)):
            exps = (exps,) if terms == 1 else exps
            start = np.array([sign * spread] * terms + list(exps) + [float(y[-1])])
            result = least_squares(residual, start, jac=jacobian, bounds=bounds, x_scale="jac", max_nfev=150,
                                   ftol=1e-12, xtol=1e-12, gtol=1e-12)
            if best is None or result.cost < best.cost:
                best = result
    law = PowerLaw(tuple(float(v) for v in best.x[:terms]), tuple(float(v) for v in best.x[terms:2 * terms]),
                   float(best.x[-1]))
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - 2.0 * float(best.cost) / ss_tot if ss_tot > 0 else 1.0
    return law, r2


def critical_ratio(ratios: Sequence[float], general_change: Sequence[float], tolerance: float) -> Optional[float]:
    """The largest ratio whose general-loss change is at most ``tolerance``: a swept ratio, or the point between
    the last feasible and the next ratio where the linearly interpolated change reaches the tolerance.  None when
    even the smallest swept ratio is infeasible."""
    order = np.argsort(ratios)
    r = np.asarray(ratios, dtype=np.float64)[order]
    d = np.asarray(general_change, dtype=np.float64)[order]
    feasible = d <= tolerance
    if not feasible[0]:
        return None
    # the first infeasible ratio after a feasible run ends the feasible region (a non-monotone change beyond it is
    # noise of the fit: the paper's feasible set is an interval [0, CMR])
    first_bad = int(np.argmin(feasible)) if not feasible.all() else len(r)
    if first_bad == len(r):
        return float(r[-1])
    lo, hi = first_bad - 1, first_bad
    return float(r[lo] + (tolerance - d[lo]) * (r[hi] - r[lo]) / (d[hi] - d[lo]))


def fit_cmr_law(budgets: Sequence[float], cmrs: Sequence[float]) -> tuple[PowerLaw, float]:
    """Eq. 8: the CMR as a one-term power law of the token budget."""
    return fit_power_law(budgets, cmrs, terms=1)
