"""The scaling law with learning-rate annealing (Tissue, Wang and Wang 2024, "Scaling Law with Learning Rate
Annealing", 2408.11029): the loss after step ``s`` of any learning-rate schedule is

    L(s) = L0 + A * S1(s) ** -alpha - C * S2(s)

``S1(s) = sum_{i<=s} eta_i`` is the *forward area* (the area under the lr curve: how far the optimizer has moved)
and ``S2(s) = sum_{i<=s} m_i`` with ``m_i = lambda * m_{i-1} + (eta_{i-1} - eta_i)`` is the *annealing area with
momentum*: each drop of the lr adds to a momentum that decays by ``lambda`` (paper: 0.999) per step, so the loss
keeps falling for a while after the lr has dropped.  Following the authors' fitting script, the warm-up steps count
as steps at the peak lr in both areas (their section 3.4: warm-up shifts the curve early, not its annealing term).

Pure numpy/scipy; three steps:

1. :func:`lr_areas` — ``S1``, ``S2`` of an absolute lr curve;
2. :func:`fit_law` — ``L0, A, alpha, C`` from one or more logged loss curves, as the authors fit: Huber loss
   (delta 1e-3) on the residuals of ``log L``, L-BFGS-B with non-negative bounds, from a grid of starting points,
   keeping the best.  A log line is the mean loss of the steps since the previous line, so each observation is
   compared with the law's mean over the same steps (exact, where the authors evaluate at the logged step);
3. :func:`predict` — the law's loss at every step of another schedule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: the paper's decay factor of the annealing momentum, and the Huber delta of its fit
DECAY_FACTOR = 0.999
HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class AnnealLaw:
    L0: float
    A: float
    alpha: float
    C: float
    decay_factor: float = DECAY_FACTOR

    def as_dict(self) -> dict[str, float]:
        return {"L0": self.L0, "A": self.A, "alpha": self.alpha, "C": self.C, "decay_factor": self.decay_factor}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "AnnealLaw":
        from effitrain.registry import ConfigError

        missing = [k for k in ("L0", "A", "alpha", "C") if not isinstance(values.get(k), (int, float))]
        if missing:
            raise ConfigError(f"{where}: the fitted law needs numbers L0, A, alpha, C (and optionally decay_factor); "
                              f"missing or not a number: {', '.join(missing)}")
        return cls(float(values["L0"]), float(values["A"]), float(values["alpha"]), float(values["C"]),
                   float(values.get("decay_factor", DECAY_FACTOR)))

    def loss(self, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
        return self.L0 + self.A * np.power(s1, -self.alpha) - self.C * s2


def lr_areas(lrs: Sequence[float], *, warmup_steps: int = 0,
             decay_factor: float = DECAY_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """``(S1, S2)`` after each step of an absolute lr curve (``lrs[i]``: the lr of step ``i``, 0-based), the
    warm-up steps counted at the peak (the first lr after them) as the authors do."""
    eta = np.asarray(lrs, dtype=np.float64).copy()
    if eta.ndim != 1 or len(eta) == 0 or (eta < 0).any():
        raise ValueError("lr_areas: need a non-empty 1-D curve of non-negative learning rates")
    if 0 < warmup_steps < len(eta):
        eta[:warmup_steps] = eta[warmup_steps]
    s1 = np.cumsum(eta)
    momentum = np.zeros_like(eta)
    for i in range(1, len(eta)):
        momentum[i] = decay_factor * momentum[i - 1] + (eta[i - 1] - eta[i])
    return s1, np.cumsum(momentum)


@dataclass(frozen=True)
class Curve:
    """One logged run: its areas at every step, and the loss of each log window ``(start, end]`` of steps (the
    log line at step ``end`` averages steps ``start+1..end``, 1-based; step ``k`` is index ``k-1`` of the areas)."""
    s1: np.ndarray
    s2: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    losses: np.ndarray

    def window_means(self, per_step: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0.0], np.cumsum(per_step)])
        return (csum[self.ends] - csum[self.starts]) / (self.ends - self.starts)


def curve_from_log(lrs: Sequence[float], log_steps: Sequence[int], losses: Sequence[float], *, warmup_steps: int,
                   decay_factor: float, fit_from: int = 0) -> Curve:
    """A :class:`Curve` from a run's lr per step and its log lines ``(step, mean loss since the previous line)``;
    lines whose window starts before ``fit_from`` are left out (the loss of the first steps is off the law)."""
    s1, s2 = lr_areas(lrs, warmup_steps=warmup_steps, decay_factor=decay_factor)
    ends = np.asarray(log_steps, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    keep = (starts >= fit_from) & (ends <= len(s1)) & (ends > starts)
    return Curve(s1, s2, starts[keep], ends[keep], np.asarray(losses, dtype=np.float64)[keep])


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(residual)
    return np.where(a < delta, 0.5 * residual ** 2, delta * a - 0.5 * delta ** 2)


def fit_law(curves: Sequence[Curve], *, decay_factor: float = DECAY_FACTOR,
            huber_delta: float = HUBER_DELTA) -> tuple[AnnealLaw, float]:
    """The law that best fits the curves (all of them at once), and its R^2 over their log lines."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    curves = [c for c in curves if len(c.losses)]
    if not curves or sum(len(c.losses) for c in curves) < 4:
        raise ValueError("anneal_law: need at least 4 logged losses (after fit_from) to fit L0, A, alpha, C")
    observed = np.concatenate([c.losses for c in curves])
    if (observed <= 0).any() or not np.isfinite(observed).all():
        raise ValueError("anneal_law: the logged losses must be finite and positive")

    # the law is linear in L0, A, C: only S1^-alpha (and its alpha-derivative) change with alpha, so each window's
    # mean of the law is L0 + A*P - C*Q with Q fixed; the gradient is analytic (L-BFGS-B needs ~10x fewer calls)
    q = np.concatenate([c.window_means(c.s2) for c in curves])
    log_s1 = [np.log(c.s1) for c in curves]

    def terms(alpha: float) -> tuple[np.ndarray, np.ndarray]:
        powers = [np.exp(-alpha * ls) for ls in log_s1]
        return (np.concatenate([c.window_means(pw) for c, pw in zip(curves, powers)]),
                np.concatenate([c.window_means(pw * ls) for c, pw, ls in zip(curves, powers, log_s1)]))

    def predicted(params: np.ndarray) -> np.ndarray:
        L0, A, alpha, C = params
        return L0 + A * terms(alpha)[0] - C * q

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        L0, A, alpha, C = params
        with np.errstate(all="ignore"):  # S1 ** -alpha of a far-off alpha overflows: the point is rejected below
            p, p_log = terms(alpha)
            pred = L0 + A * p - C * q
        if not np.isfinite(pred).all() or (pred <= 0).any():
            return 1e6, np.zeros(4)  # the log is undefined: a point the optimizer must leave
        residual = np.log(observed) - np.log(pred)
        dhuber = np.clip(residual, -huber_delta, huber_delta)   # d huber / d residual
        weight = -dhuber / pred                                    # d huber / d pred
        grad = np.array([weight.sum(), (weight * p).sum(), (weight * -A * p_log).sum(), (weight * -q).sum()])
        return float(_huber(residual, huber_delta).sum()), grad

    # the authors' grid, with L0 and A scaled to the observed losses and C to the areas of these runs (their grid
    # assumes their lr of 2e-4 and 20k steps; a tiny run's S2 is orders of magnitude away)
    top = float(observed.max())
    s2_max = max(float(c.s2.max()) for c in curves) or 1.0
    grid = itertools.product(np.array([0.2, 0.7]) * top, np.array([0.1, 1.0]) * top,
                             np.array([0.1, 0.4, 0.8]), np.array([0.01, 0.3]) * top / s2_max)
    best, best_fun = None, np.inf
    # L-BFGS-B's 4x4 algebra goes through BLAS; its threads only contend on a busy machine (3x slower on 2 cores)
    with threadpool_limits(1):
        for L0, A, alpha, C in grid:
            result = minimize(objective, np.array([L0, A, alpha, C]), method="L-BFGS-B", jac=True,
                              bounds=[(0, None), (0, None), (0, None), (0, None)],
                              options={"maxiter": 2000, "ftol": 1e-10, "gtol": 1e-8})
            if result.fun < best_fun:
                best, best_fun = result.x, result.fun
    law = AnnealLaw(*(float(v) for v in best), decay_factor=decay_factor)
    pred = predicted(best)
    r2 = 1.0 - float(((observed - pred) ** 2).sum()) / max(float(((observed - observed.mean()) ** 2).sum()), 1e-30)
    return law, r2


def predict(law: AnnealLaw, lrs: Sequence[float], *, warmup_steps: int = 0) -> np.ndarray:
    """The law's loss after each step of the lr curve ``lrs``."""
    s1, s2 = lr_areas(lrs, warmup_steps=warmup_steps, decay_factor=law.decay_factor)
    return law.loss(s1, s2)


def schedule_lrs(max_steps: int, peak_lr: float, multiplier) -> np.ndarray:
    """The absolute lr of each step ``0..max_steps-1`` of a scheduler block's curve (``multiplier(step)``)."""
    return np.array([peak_lr * multiplier(step) for step in range(max_steps)], dtype=np.float64)
