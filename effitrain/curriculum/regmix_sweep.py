"""``sweep: {name: regmix}``: the RegMix stage (effitrain/curriculum/regmix.py has the arithmetic).

``members``: the token distribution of the stage's packed training rows per domain is the prior; ``num_proxies``
mixtures are drawn around it; each member is the stage's own run config with ``curriculum: mixture`` and a
one-point ``timeline.mixture`` holding its mixture (no final model: the proxies are only measured).
``conclude``: the members' final eval losses on ``target`` are regressed on their mixtures and the predicted-best
mixture becomes the delta ``{curriculum: {name: mixture}, timeline: {mixture: ...}}`` that the main stage merges
with ``config_from``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from effitrain.curriculum import regmix
from effitrain.registry import ConfigError, choices_text, did_you_mean


def build(params: Any) -> "RegMixSweep":
    return RegMixSweep(params)


def mixture_delta(domains: list[str], weights: np.ndarray) -> dict[str, Any]:
    """The config keys that train with ``weights`` over ``domains`` from the first step (6 decimals, summing to 1:
    the largest weight takes the rounding)."""
    rounded = [round(float(w), 6) for w in weights]
    top = int(np.argmax(rounded))
    rounded[top] = round(1.0 - sum(w for i, w in enumerate(rounded) if i != top), 6)
    value = {d: w for d, w in zip(domains, rounded) if w > 0}
    return {"curriculum": {"name": "mixture"},
            "timeline": {"mixture": {"unit": "step", "points": [{"at": 0, "value": value}]}}}


def domain_rows(run_cfg: dict[str, Any]) -> dict[str, int]:
    """Packed training rows per domain that a run config produces (source -> selection -> tokenizer -> packing, as
    the run builds them; each row is ``dataset.seq_len`` tokens).  Builds data only, no model."""
    from datasets import DatasetDict

    from effitrain.config.spec import validate
    from effitrain.data.splits import build_packed_splits
    from effitrain.data.sources import domain_indices
    from effitrain.paths import cache_dir

    spec = validate(run_cfg)
    pool = spec.block("dataset").build()
    selection = spec.block("selection").build(pool, cache_dir=cache_dir("selection"), seed=spec.train.seed)
    _, packed_train, _ = build_packed_splits(spec.block("dataset").params, spec.block("model").params,
                                             DatasetDict(train=selection.train, eval=pool["eval"]),
                                             tokenizer_corpus=pool["train"])
    return {d: len(idx) for d, idx in domain_indices(packed_train).items()}


def token_distribution(run_cfg: dict[str, Any]) -> dict[str, float]:
    """Each domain's share of the stage's packed training tokens: the paper's prior."""
    rows = domain_rows(run_cfg)
    total = sum(rows.values())
    return {d: n / total for d, n in rows.items()}


class RegMixSweep:
    def __init__(self, params: Any) -> None:
        self.params = params
        self._prior: dict[str, float] | None = None  # members() measures it; conclude() in the same process reuses it

    def prior(self, run_cfg: dict[str, Any]) -> dict[str, float]:
        if self._prior is None:
            self._prior = token_distribution(run_cfg)
        return self._prior

    def _seed(self, run_cfg: dict[str, Any]) -> int:
        return self.params.seed if self.params.seed is not None else int(run_cfg.get("train", {}).get("seed", 0))

    def members(self, run_cfg: dict[str, Any], *, say: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
        p = self.params
        prior = self.prior(run_cfg)
        domains = sorted(prior)
        if p.target != "all" and p.target not in domains:
            raise ConfigError(f"sweep.target: '{p.target}' is not a domain of the training data"
                              f"{did_you_mean(p.target, domains)}; valid: {choices_text(['all', *domains])}")
        say("regmix: token distribution " + ", ".join(f"{d} {prior[d]:.3f}" for d in domains))
        mixtures = regmix.proxy_mixtures([prior[d] for d in domains], p.num_proxies, seed=self._seed(run_cfg),
                                         temperature=p.temperature, min_strength=p.min_strength,
                                         max_strength=p.max_strength, max_usage=p.max_usage, minimum=p.minimum)
        members = []
        for i, weights in enumerate(mixtures):
            cfg = copy.deepcopy(run_cfg)
            delta = mixture_delta(domains, weights)
            cfg["curriculum"] = delta["curriculum"]
            cfg["timeline"] = {k: v for k, v in (cfg.get("timeline") or {}).items() if k != "mixture"}
            cfg["timeline"]["mixture"] = delta["timeline"]["mixture"]
            cfg.setdefault("train", {})["save_final_model"] = False  # a proxy is measured, never reused
            members.append((f"proxy-{i:03d}", cfg))
        return members

    def conclude(self, run_cfg: dict[str, Any], results: list[tuple[str, dict[str, Any], dict[str, Any]]], *,
                 say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
        p = self.params
        prior = self.prior(run_cfg)
        domains = sorted(prior)
        x, y = [], []
        for name, cfg, summary in results:
            mix = cfg["timeline"]["mixture"]["points"][0]["value"]
            loss = summary.get("final_eval_loss") if p.target == "all" else \
                (summary.get("eval_losses") or {}).get(p.target)
            if loss is None or not np.isfinite(loss):
                raise ConfigError(f"sweep: proxy {name} reported no eval loss for '{p.target}'; the proxies need "
                                  f"train.eval_batches >= 1")
            x.append([mix.get(d, 0.0) for d in domains])
            y.append(float(loss))
        seed = self._seed(run_cfg)
        model = regmix.fit_regression(np.array(x), y, kind=p.regression, seed=seed)
        best, predicted = regmix.predicted_best(model, [prior[d] for d in domains], num_samples=p.num_samples,
                                                top_k=min(p.top_k, p.num_samples), seed=seed)
        delta = mixture_delta(domains, best)
        chosen = delta["timeline"]["mixture"]["points"][0]["value"]
        say("regmix: predicted-best mixture " + ", ".join(f"{d} {w:.3f}" for d, w in chosen.items()) +
            f" (predicted {p.target} loss {predicted:.4f}; proxies {min(y):.4f}..{max(y):.4f})")
        record = {"method": "regmix", "target": p.target, "regression": p.regression, "domains": domains,
                  "token_distribution": {d: round(prior[d], 6) for d in domains},
                  "predicted_loss": round(predicted, 6),
                  "proxies": [{"name": n, "mixture": dict(zip(domains, xi)), "loss": yi}
                              for (n, _, _), xi, yi in zip(results, x, y)]}
        return delta, record
