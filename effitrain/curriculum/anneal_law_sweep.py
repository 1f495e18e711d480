"""``sweep: {name: anneal_law}``: the stage that fits the scaling law with learning-rate annealing
(effitrain/curriculum/anneal_law.py has the arithmetic) and concludes the schedule it predicts best.

``members``: one run of the stage's config per entry of ``fit_schedulers`` (the paper fits one or two curves),
with that scheduler block.  ``conclude``: every member's logged training loss (``metrics.jsonl``; each line the
mean of the steps since the previous one) and its lr per step (the member's scheduler curve, as ``effitrain plan``
draws it) fit ``L0, A, alpha, C``; each ``candidates`` schedule's loss at ``predict_steps`` is predicted, and the
lowest becomes the delta ``{scheduler: {...}}`` that a stage with ``config_from`` merges.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effitrain.curriculum import anneal_law
from effitrain.registry import REGISTRY, ConfigError


def build(params: Any) -> "AnnealLawSweep":
    return AnnealLawSweep(params)


def scheduler_entry(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A scheduler block with every parameter spelled out (the block's defaults filled in)."""
    block = REGISTRY.parse("scheduler", raw, where)
    return {"name": block.name, **dataclasses.asdict(block.params)}


def run_lrs(run_cfg: dict[str, Any], *, max_steps: int | None = None) -> tuple[np.ndarray, int]:
    """The absolute lr of each optimizer step of a run config (its scheduler block over ``max_steps``, default its
    own ``train.max_steps``), and its warm-up steps."""
    from effitrain.config.spec import validate

    spec = validate(run_cfg)
    steps = int(max_steps or spec.train.max_steps)
    scheduler = spec.block("scheduler").params
    peak = getattr(spec.block("optimizer").params, "lr", None)
    if peak is None:
        raise ConfigError(f"sweep: anneal_law needs the optimizer's peak lr (optimizer.lr); "
                          f"optimizer '{spec.block('optimizer').name}' has none")
    t = spec.train
    world = t.global_batch_size // (t.micro_batch_size * t.grad_accum) if t.global_batch_size else 1
    tokens_per_step = t.micro_batch_size * t.grad_accum * world * int(spec.block("dataset").params.seq_len)
    timeline = spec.timeline.resolve(max_steps=steps, tokens_per_step=tokens_per_step)
    curve = scheduler.multiplier(steps, timeline)
    return anneal_law.schedule_lrs(steps, float(peak), curve), int(getattr(scheduler, "warmup_steps", 0))


def logged_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` of a run's training log lines (the lines the loop writes every ``log_every`` steps)."""
    steps, losses = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"sweep: anneal_law found no {path}; the fitted runs' training losses are read from it")
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a stop; the others are whole
        if isinstance(row, dict) and "tokens_per_s" in row and isinstance(row.get("loss"), (int, float)):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


class AnnealLawSweep:
    def __init__(self, params: Any) -> None:
        self.params = params

    def members(self, run_cfg: dict[str, Any], *, say: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
        try:  # the fit needs them; say so before any run trains
            import scipy.optimize  # noqa: F401
            import threadpoolctl  # noqa: F401
        except ImportError:
            raise ConfigError("sweep: anneal_law fits with scipy (pip install 'effitrain[methods]')") from None
        members = []
        for i, raw in enumerate(self.params.fit_schedulers):
            entry = scheduler_entry(raw, f"sweep.fit_schedulers[{i}]")
            cfg = copy.deepcopy(run_cfg)
            cfg["scheduler"] = entry
            cfg.setdefault("train", {})["save_final_model"] = False  # a fitted run is measured, never reused
            members.append((f"fit-{i}-{entry['name']}", cfg))
        say("anneal_law: fitting runs with " + ", ".join(m[1]["scheduler"]["name"] for m in members))
        return members

    def conclude(self, run_cfg: dict[str, Any], results: list[tuple[str, dict[str, Any], dict[str, Any]]], *,
                 say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
        p = self.params
        curves, fitted = [], []
        for name, cfg, _ in results:
            lrs, warmup = run_lrs(cfg)
            steps, losses = logged_losses(Path(cfg["run_dir"]))
            curve = anneal_law.curve_from_log(lrs, steps, losses, warmup_steps=warmup, decay_factor=p.decay_factor,
                                              fit_from=int(p.fit_from * len(lrs)))
            curves.append(curve)
            fitted.append((name, cfg["scheduler"], curve))
        try:
            law, r2 = anneal_law.fit_law(curves, decay_factor=p.decay_factor, huber_delta=p.huber_delta)
        except ValueError as exc:
            raise ConfigError(f"sweep: {exc}; log more often (train.log_every) or lower sweep.fit_from") from None
        horizon = p.predict_steps or None
        predictions = []
        for i, raw in enumerate(p.candidates):
            entry = scheduler_entry(raw, f"sweep.candidates[{i}]")
            lrs, warmup = run_lrs({**run_cfg, "scheduler": entry}, max_steps=horizon)
            final = float(anneal_law.predict(law, lrs, warmup_steps=warmup)[-1])
            predictions.append((entry, final))
        best, best_loss = min(predictions, key=lambda item: item[1])
        steps = horizon or len(run_lrs(run_cfg)[0])
        say(f"anneal_law: L = {law.L0:.4f} + {law.A:.4f}*S1^-{law.alpha:.4f} - {law.C:.4f}*S2 (R^2 {r2:.4f}); "
            f"predicted loss at step {steps}: " + ", ".join(f"{e['name']} {v:.4f}" for e, v in predictions) +
            f"; concluded: {best['name']}")
        record = {"method": "anneal_law", "law": {k: round(v, 8) for k, v in law.as_dict().items()},
                  "r2": round(r2, 6), "predict_steps": steps,
                  "fitted_runs": [{"name": n, "scheduler": s, "log_lines": len(c.losses),
                                   "last_logged_loss": round(float(c.losses[-1]), 6) if len(c.losses) else None,
                                   "law_at_last_line": round(float(c.window_means(law.loss(c.s1, c.s2))[-1]), 6)
                                   if len(c.losses) else None}
                                  for n, s, c in fitted],
                  "predictions": [{"scheduler": e, "final_loss": round(v, 6)} for e, v in predictions]}
        return {"scheduler": dict(best)}, record  # a copy: concluded.yaml without a YAML alias
