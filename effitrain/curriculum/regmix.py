"""RegMix (Liu et al. 2024, "RegMix: Data Mixture as Regression for Language Model Pre-training", 2407.01492).

Three pure steps (numpy, plus scikit-learn or LightGBM for the regression), matching the authors' code in
sail-sg/regmix (``mixture_config/synthesize_mixture.py`` and ``regression_fitting/regression.ipynb``):

1. :func:`proxy_mixtures` — the mixtures of the small proxy runs: Dirichlet draws around the *token distribution*
   of the domains.  The prior is tempered (``prior ** 0.5``, renormalised), each draw picks one of 15 strengths
   log-spaced in ``[0.1, 5]`` (small = concentrated on few domains, large = close to the prior), draws that give a
   domain more than ``max_usage`` times its natural share are rejected (it would repeat that domain too often),
   weights below ``minimum`` become 0, the rest is renormalised and rounded to multiples of ``minimum``; duplicates
   are dropped and ``n`` of the candidates are kept.
2. :func:`fit_regression` — features: the mixture weights; target: each proxy's eval loss on the target domain
   (the paper: Pile-CC validation loss).  ``lightgbm`` (the paper's main model: 1000 boosting rounds, learning rate
   0.01) or ``linear`` (the paper's linear regression).
3. :func:`predicted_best` — simulate: ``num_samples`` Dirichlet draws with the untempered prior as concentration
   (strength 1), predict each one's loss, average the ``top_k`` with the lowest prediction (paper: 100,000 and 128).

The generic shared piece is :func:`dirichlet_around`; :func:`proxy_mixtures` and :func:`predicted_best` are usable
by any mixture search that works on the simplex.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from effitrain.registry import ConfigError


def normalise(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def dirichlet_around(prior: Sequence[float], strength: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of ``Dirichlet(strength * prior)``: mean ``prior``, spread shrinking as ``strength`` grows.
    Domains with a zero prior are kept at 0 (numpy's Dirichlet needs positive concentrations)."""
    p = normalise(prior)
    out = np.zeros((size, len(p)))
    live = p > 0
    out[:, live] = rng.dirichlet(p[live] * strength, size)
    return out


def proxy_mixtures(prior: Sequence[float], n: int, *, seed: int, temperature: float = 0.5,
                   min_strength: float = 0.1, max_strength: float = 5.0, num_strengths: int = 15,
                   max_usage: float = 15.0, minimum: float = 2e-4, sample_multiplier: int = 100) -> np.ndarray:
    """``[n, domains]`` distinct mixtures for the proxy runs (step 1 of the module docstring)."""
    p = normalise(prior)
    bound = np.minimum(p * max_usage, 1.0)          # the authors bound with the untempered prior
    tempered = p ** temperature if temperature < 1.0 else p
    tempered = tempered / tempered.sum()
    strengths = np.logspace(np.log10(min_strength), np.log10(max_strength), num_strengths)
    rng = np.random.default_rng(seed)
    total = n * sample_multiplier
    which = rng.integers(num_strengths, size=total)      # each draw's strength, uniformly among the 15
    draws = np.zeros((total, len(p)))
    for k, strength in enumerate(strengths):
        rows = np.flatnonzero(which == k)
        draws[rows] = dirichlet_around(tempered, float(strength), len(rows), rng)
    draws = draws[(draws <= bound).all(axis=1)]          # reject draws that would overuse a domain
    draws = np.where(draws < minimum, 0.0, draws)
    draws = draws[draws.sum(axis=1) > 0]
    kept = np.round(draws / draws.sum(axis=1, keepdims=True) / minimum) * minimum
    unique = _deduplicate(kept) if len(kept) else np.zeros((0, len(p)))
    if len(unique) < n:
        raise ConfigError(f"sweep.num_proxies: only {len(unique)} distinct mixtures pass the usage bound "
                          f"(max_usage {max_usage}) for {n} proxies; lower num_proxies or raise max_usage")
    return unique[np.sort(rng.choice(len(unique), size=n, replace=False))]


def _deduplicate(samples: np.ndarray, threshold: float = 1e-5) -> np.ndarray:
    """Drop mixtures within ``threshold`` (L1) of the previous one in lexicographic order, as the authors do."""
    ordered = samples[np.lexsort(samples.T)]
    out = [ordered[0]]
    for row in ordered[1:]:
        if np.abs(row - out[-1]).sum() > threshold:
            out.append(row)
    return np.array(out)


def fit_regression(mixtures: np.ndarray, losses: Sequence[float], *, kind: str, seed: int) -> Any:
    """A regressor ``mixture -> loss`` with a ``predict([k, domains])`` method (step 2)."""
    x = np.asarray(mixtures, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"regression: need at least two (mixture, loss) pairs, got {len(x)} and {len(y)}")
    if kind == "linear":
        from sklearn.linear_model import LinearRegression

        return LinearRegression().fit(x, y)
    if kind == "lightgbm":
        try:
            import lightgbm as lgb
        except ImportError:
            raise ConfigError("sweep.regression: lightgbm is not installed (pip install 'effitrain[methods]'); or "
                              "use regression: linear") from None
        # the notebook's hyper-parameters; one thread, deterministic; min_child_samples lowered so that a few dozen
        # proxies can still split
        model = lgb.LGBMRegressor(objective="regression", boosting_type="gbdt", n_estimators=1000,
                                  learning_rate=1e-2, seed=seed, n_jobs=1, deterministic=True, verbose=-1,
                                  min_child_samples=min(20, max(2, len(x) // 4)))
        return model.fit(x, y)
    raise ConfigError(f"sweep.regression: unknown regression '{kind}'; valid: lightgbm, linear")


def predicted_best(model: Any, prior: Sequence[float], *, num_samples: int, top_k: int,
                   seed: int) -> tuple[np.ndarray, float]:
    """The mean of the ``top_k`` simulated mixtures with the lowest predicted loss, and that mean's prediction."""
    rng = np.random.default_rng(seed)
    samples = dirichlet_around(prior, 1.0, num_samples, rng)
    predicted = np.asarray(model.predict(samples), dtype=np.float64)
    best = samples[np.argsort(predicted, kind="stable")[:top_k]].mean(axis=0)
    return best, float(np.asarray(model.predict(best[None, :]))[0])
