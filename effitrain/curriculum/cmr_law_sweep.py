"""``sweep: {name: cmr_law}``: the stage that finds the critical mixture ratio of a continual pre-training
(effitrain/curriculum/cmr_law.py has the arithmetic).

``members``: one continual run per ``ratios`` entry, each the stage's run config (from the stage's starting model)
with ``curriculum: mixture`` and a one-point mixture: ``domain`` at the ratio, the other domains (the replayed
general corpus) sharing the rest in their token shares.  ``conclude``: every member's eval losses (its
``metrics.jsonl``; the evaluation at step 0 is the reference) give the general and domain loss changes over the
tokens trained; the paper's power laws are fitted per ratio; the critical ratio at the budget is the largest ratio
whose general-loss change stays within ``tolerance`` (beyond the members' length, the CMR-vs-tokens law
extrapolates); the concluded mixture trains with it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effitrain.curriculum import cmr_law
from effitrain.curriculum.regmix_sweep import mixture_delta, token_distribution
from effitrain.registry import ConfigError, choices_text, did_you_mean

#: the token axis of the fits, in millions (the paper counts in units of 200M; the unit only scales coefficients)
TOKEN_UNIT = 1e6


def build(params: Any) -> "CMRLawSweep":
    return CMRLawSweep(params)


def eval_curve(run_dir: Path, general: dict[str, float], domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, general-loss change, domain-loss change)`` at each evaluation after the first, from a run's
    ``metrics.jsonl``; the general loss is the eval loss of the general domains weighted by their token shares."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(f"eval_loss/{d}" in row for d in [*general, domain]):
            rows.append(row)
    if not rows or rows[0].get("step") != 0:
        raise ConfigError(f"sweep: cmr_law found no evaluation at step 0 in {path}; the members need "
                          f"train.eval_at_start: true (the loss changes are measured from it)")

    def general_loss(row: dict) -> float:
        return sum(w * float(row[f"eval_loss/{d}"]) for d, w in general.items())

    start_general, start_domain = general_loss(rows[0]), float(rows[0][f"eval_loss/{domain}"])
    later = [r for r in rows[1:] if r.get("tokens", 0) > 0]
    tokens = np.array([float(r["tokens"]) / TOKEN_UNIT for r in later])
    return (tokens, np.array([general_loss(r) - start_general for r in later]),
            np.array([float(r[f"eval_loss/{domain}"]) - start_domain for r in later]))


class CMRLawSweep:
    def __init__(self, params: Any) -> None:
        self.params = params
        self._shares: dict[str, float] | None = None  # members() measures them; conclude() in the same process reuses

    def general_shares(self, run_cfg: dict[str, Any]) -> dict[str, float]:
        """The general domains (every domain but ``domain``) and their shares of the general tokens."""
        if self._shares is None:
            prior = token_distribution(run_cfg)
            if self.params.domain not in prior:
                raise ConfigError(f"sweep.domain: '{self.params.domain}' is not a domain of the training data"
                                  f"{did_you_mean(self.params.domain, list(prior))}; valid: {choices_text(prior)}")
            rest = {d: w for d, w in sorted(prior.items()) if d != self.params.domain and w > 0}
            if not rest:
                raise ConfigError(f"sweep.domain: the training data has no domain besides '{self.params.domain}' "
                                  f"to replay as general data")
            total = sum(rest.values())
            self._shares = {d: w / total for d, w in rest.items()}
        return self._shares

    def _weights(self, run_cfg: dict[str, Any], ratio: float) -> tuple[list[str], np.ndarray]:
        general = self.general_shares(run_cfg)
        domains = sorted([*general, self.params.domain])
        return domains, np.array([ratio if d == self.params.domain else (1 - ratio) * general[d] for d in domains])

    def members(self, run_cfg: dict[str, Any], *, say: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
        try:  # the fits need them; say so before any run trains
            import scipy.optimize  # noqa: F401
            import threadpoolctl  # noqa: F401
        except ImportError:
            raise ConfigError("sweep: cmr_law fits with scipy (pip install 'effitrain[methods]')") from None
        general = self.general_shares(run_cfg)
        say(f"cmr_law: domain {self.params.domain}; general data " +
            ", ".join(f"{d} {w:.3f}" for d, w in general.items()))
        members = []
        for ratio in sorted(set(self.params.ratios)):
            cfg = copy.deepcopy(run_cfg)
            delta = mixture_delta(*self._weights(run_cfg, ratio))
            cfg["curriculum"] = delta["curriculum"]
            cfg["timeline"] = {k: v for k, v in (cfg.get("timeline") or {}).items() if k != "mixture"}
            cfg["timeline"]["mixture"] = delta["timeline"]["mixture"]
            train = cfg.setdefault("train", {})
            train["save_final_model"] = False   # a member is measured, never reused
            train["eval_at_start"] = True       # the reference of the loss changes
            members.append((f"ratio-{ratio:.4f}", cfg))
        return members

    def conclude(self, run_cfg: dict[str, Any], results: list[tuple[str, dict[str, Any], dict[str, Any]]], *,
                 say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
        p = self.params
        general = self.general_shares(run_cfg)
        curves, tokens_per_step = [], None
        for name, cfg, summary in results:
            ratio = float(cfg["timeline"]["mixture"]["points"][0]["value"].get(p.domain, 0.0))
            curves.append((name, ratio, *eval_curve(Path(cfg["run_dir"]), general, p.domain)))
            if summary.get("steps") and summary.get("tokens"):
                tokens_per_step = float(summary["tokens"]) / float(summary["steps"])
        member_steps = int(results[0][2].get("steps") or 0)
        tokens_per_step = tokens_per_step or 0.0
        ratios = [c[1] for c in curves]
        fitted = min(len(c[2]) for c in curves) >= 3
        # no law fits fewer than 3 evaluations after the start (a smoke run of a few steps): the CMR is then read
        # from the changes measured at the members' last evaluation, for their own length, and the record says so
        steps = (p.budget_steps or member_steps) if fitted else member_steps
        budget = steps * tokens_per_step / TOKEN_UNIT
        record: dict[str, Any] = {"method": "cmr_law", "domain": p.domain, "tolerance": p.tolerance,
                                  "general_shares": {d: round(w, 6) for d, w in general.items()},
                                  "fitted": fitted, "budget_steps": steps,
                                  "budget_tokens": int(round(budget * TOKEN_UNIT))}
        rows, gen_laws = [], []
        for name, ratio, tokens, d_gen, d_dom in curves:
            row = {"name": name, "ratio": ratio, "evaluations": len(tokens),
                   "general_change_last": round(float(d_gen[-1]), 6) if len(d_gen) else None,
                   "domain_change_last": round(float(d_dom[-1]), 6) if len(d_dom) else None}
            if fitted:
                # the paper's two-term general law needs 5 evaluations; a shorter member gets Eq. 6's one-term form
                gen_law, gen_r2 = cmr_law.fit_power_law(tokens, d_gen, terms=2 if len(tokens) >= 5 else 1)
                dom_law, dom_r2 = cmr_law.fit_power_law(tokens, d_dom, terms=1)
                gen_laws.append(gen_law)
                row.update(general_law=gen_law.as_dict(), general_r2=round(gen_r2, 6), domain_law=dom_law.as_dict(),
                           domain_r2=round(dom_r2, 6))
            rows.append(row)
        record["members"] = rows
        if not fitted:
            if any(len(c[3]) == 0 for c in curves):
                raise ConfigError("sweep: cmr_law: a member has no evaluation after step 0; its run needs at least "
                                  "one step and an evaluation at the end")
            cmr = cmr_law.critical_ratio(ratios, [float(c[3][-1]) for c in curves], p.tolerance)
            how = ("measured at the members' last evaluation: fewer than 3 evaluations after the start fit no law; "
                   "evaluate more often (train.eval_every) for the paper's laws")
        elif budget <= min(float(c[2].max()) for c in curves) * (1 + 1e-9):
            changes = [float(law(budget)) for law in gen_laws]
            cmr = cmr_law.critical_ratio(ratios, changes, p.tolerance)
            record["predicted_general_change"] = {f"{r:.4f}": round(c, 6) for r, c in zip(ratios, changes)}
            how = "at the budget, from the fitted general-loss laws"
        else:
            # Eq. 8: the CMR at budgets the members reached, then its power law, extrapolated to the budget
            observed_max = min(float(c[2].max()) for c in curves)
            grid = np.linspace(observed_max / 4, observed_max, 8)
            points = [(t, cmr_law.critical_ratio(ratios, [float(law(t)) for law in gen_laws], p.tolerance))
                      for t in grid]
            points = [(t, c) for t, c in points if c is not None]
            if len(points) < 3:
                cmr = None
            else:
                law, r2 = cmr_law.fit_cmr_law([t for t, _ in points], [c for _, c in points])
                cmr = float(np.clip(law(budget), 0.0, 1.0))
                record["cmr_law"] = {**law.as_dict(), "r2": round(r2, 6),
                                     "points": [[round(t * TOKEN_UNIT), round(c, 6)] for t, c in points]}
            how = f"extrapolated by the CMR-vs-tokens law from the members' {observed_max * TOKEN_UNIT:,.0f} tokens"
        if cmr is None:
            raise ConfigError(f"sweep: cmr_law: even the smallest domain ratio ({min(ratios)}) raises the general "
                              f"loss by more than the tolerance {p.tolerance} at {steps} steps; sweep smaller ratios "
                              f"or raise the tolerance")
        domains, weights = self._weights(run_cfg, cmr)
        delta = mixture_delta(domains, weights)
        record["critical_mixture_ratio"] = round(cmr, 6)
        say(f"cmr_law: critical mixture ratio of {p.domain} {cmr:.3f} for {steps} steps ({how}; tolerance "
            f"{p.tolerance})")
        return delta, record
