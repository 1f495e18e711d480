#!/usr/bin/env python
"""The two fitted laws against runs they did not see: ``anneal_law`` (loss curves of held-out lr schedules) and
``cmr_law`` (continual runs at the predicted critical mixture ratio and around it).

**anneal_law.**  ``+recipe=anneal_law`` runs as shipped except for its length: its sweep stage trains the two
fitted runs (constant and cosine, ``--steps`` steps each, a log line every ``--log-every`` steps) and fits
``L = L0 + A*S1^-alpha - C*S2`` to their training-loss log lines; its main stage is cut to 20 steps (it only trains
the concluded schedule, which the held-out runs below cover).  Then each held-out schedule (``HELD_OUT``: WSD with
a 20% decay, a cosine to lr 0 instead of 0.1x, a two-step decay) trains as a plain run of the same config (same
model, data, seed, steps; the script checks that its ``config.yaml`` differs from the fitted cosine run's only in
the scheduler and where it runs).  For each, the fitted law predicts every log window (the law's mean over the
window's steps, as the fit compares) and the script reports the error of the last window and the mean absolute
error (MAE) over the windows the fit would use (from ``fit_from``, 10% of the run).  Two references: a naive
predictor, the fitted cosine run's own curve taken as the held-out run's; and the noise floor, the MAE between the
cosine run at seed 0 and at seed+1 (no predictor of one run's curve can do better than a second seed of it).

**cmr_law.**  ``+recipe=cmr_law`` runs as shipped (a 100-step general-only base, four 30-step continual runs at code
ratios 1/8..3/4, the CMR for a 60-step budget, and the main stage: 60 continual steps at the CMR).  Then the base
continues for the same 60 steps at 0 (all general), 0.5x the CMR, 2x the CMR (or halfway to 1 when 2x passes it)
and 1 (all code), as plain runs whose config differs from the main stage's only in the mixture.  Every arm's
general loss (the eval loss of the general domains, weighted by their token shares, as the law measures it) and
code loss at its last evaluation are compared with the base's (its evaluation at step 0); an arm is *feasible* when
its general loss rose by at most the tolerance (0.05).  The claim holds when the CMR arm is feasible and no other
feasible arm has a clearly lower code loss.

    python scripts/bench_laws.py                                  # both, 300-step anneal runs, seed 0
    python scripts/bench_laws.py --only anneal --steps 200
    python scripts/bench_laws.py --write docs/benchmarks.md       # replace its section ("Fitted laws")
    python scripts/bench_laws.py --reuse --write docs/benchmarks.md   # re-render from finished runs

On a shared CPU machine run it with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section, with_reading  # noqa: E402

SECTION_TITLE = "## Fitted laws: anneal_law and cmr_law"
SECTION_START = "<!-- bench_laws:start -->"
SECTION_END = "<!-- bench_laws:end -->"
#: config keys that do not change what trains: the recipe's description and whether a run dir may be replaced
NOT_TRAINING = ("recipe", "overwrite")
WARMUP = 10  # the recipe's fitted schedules' warm-up; every held-out schedule warms up the same way


def multistep_points(steps: int) -> list[dict]:
    """A two-step decay (x0.316 at 60% of the run, x0.1 at 85%; each drop over one step), after the same linear
    warm-up as the fitted runs: the lr curve the ``timeline`` scheduler follows."""
    a, b = int(0.6 * steps), int(0.85 * steps)
    return [{"at": 0, "value": 0.0}, {"at": WARMUP, "value": 1.0}, {"at": a, "value": 1.0},
            {"at": a + 1, "value": 0.316}, {"at": b, "value": 0.316}, {"at": b + 1, "value": 0.1}]


def _flow(value: Any) -> str:
    """A value in Hydra's override grammar (no quotes, no spaces)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_flow(v) for v in value) + "]"
    return str(value)


def held_out(steps: int) -> dict[str, tuple[str, list[str]]]:
    """name -> (what it is, the overrides that make it)."""
    return {
        "wsd_20": ("WSD, 20% exponential decay to 0.1x", ["scheduler=wsd", f"scheduler.warmup_steps={WARMUP}",
                                                         "scheduler.decay_fraction=0.2"]),
        "cosine_to_0": ("cosine to 0 (the fitted cosine ends at 0.1x)",
                        ["scheduler=cosine", f"scheduler.warmup_steps={WARMUP}", "scheduler.min_lr_ratio=0.0"]),
        "two_step": ("multi-step: x0.316 at 60%, x0.1 at 85%",
                     ["scheduler=timeline", "+timeline.lr=" + _flow({"unit": "step", "interpolate": "linear",
                                                                      "points": multistep_points(steps)})]),
    }


# ------------------------------------------------------------------------------------------------ pure parts
def window_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """The error of the last window (predicted - measured), the mean absolute error over all windows, and that MAE
    as a percentage of the mean measured loss (the paper's relative error)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or not len(p):
        raise ValueError(f"window_errors: {len(p)} predicted and {len(m)} measured windows")
    mae = float(np.abs(p - m).mean())
    return {"final_error": float(p[-1] - m[-1]), "mae": mae, "mae_pct": 100.0 * mae / float(m.mean())}


def anchored_prediction(law_target: Sequence[float], law_reference: Sequence[float],
                        measured_reference: Sequence[float]) -> np.ndarray:
    """A schedule's curve predicted from a measured run of another schedule on the same batches: the measured
    curve plus the law's difference between the two schedules (the batches' noise, common to both, cancels)."""
    return np.asarray(measured_reference, dtype=np.float64) + (np.asarray(law_target, dtype=np.float64)
                                                               - np.asarray(law_reference, dtype=np.float64))


def general_loss(row: dict, shares: dict[str, float]) -> float:
    """The general loss of an eval row as the cmr_law sweep measures it: the general domains' eval losses weighted
    by their token shares."""
    return sum(w * float(row[f"eval_loss/{d}"]) for d, w in shares.items())


def arm_verdicts(arms: list[dict], tolerance: float) -> list[dict]:
    """Each arm (``ratio``, ``general_change``, ``domain``) marked ``feasible`` (general loss rose by at most the
    tolerance) and ``best_feasible`` (the lowest domain loss among the feasible arms)."""
    out = [{**a, "feasible": a["general_change"] <= tolerance} for a in arms]
    feasible = [a for a in out if a["feasible"]]
    best = min((a["domain"] for a in feasible), default=None)
    for a in out:
        a["best_feasible"] = a["feasible"] and a["domain"] == best
    return out


def cmr_arms(cmr: float, multiples: Sequence[float]) -> list[tuple[float, str]]:
    """``(ratio, label)`` of the arms around the CMR: 0 and 1 are all general and all domain data; any other
    multiple ``x`` is ``x * cmr``, or halfway from the CMR to 1 where that passes 1."""
    out = []
    for x in multiples:
        if x in (0, 1):
            out.append((float(x), "all general" if x == 0 else "all domain"))
        elif x * cmr < 1:
            out.append((x * cmr, f"{x:g}x CMR"))
        else:
            out.append(((1 + cmr) / 2, f"halfway from the CMR to 1 ({x:g}x passes 1)"))
    return out


def arm_overrides(ratio: float, shares: dict[str, float], domain: str, base_model: str, warmup: int, steps: int,
                  common: list[str], model_keys: Optional[dict[str, Any]] = None) -> list[str]:
    """A plain run continuing the base at ``ratio`` (the general domains sharing the rest by token share), as the
    recipe's main stage continues it at the CMR.  ``model_keys``: the main stage's other model settings (the stage
    that continues the base sets e.g. ``attn_implementation`` from it), so the arms load the base the same way."""
    weights = {d: (1 - ratio) * w for d, w in shares.items()}
    weights[domain] = ratio
    value = {d: round(w, 6) for d, w in sorted(weights.items()) if round(w, 6) > 0}
    top = max(value, key=value.get)
    value[top] = round(1 - sum(w for d, w in value.items() if d != top), 6)
    model = [f"model.{k}={v}" for k, v in sorted((model_keys or {}).items())
             if k not in ("name", "path") and v is not None]
    return ["model=pretrained", f"model.path={base_model}", *model, "curriculum=mixture",
            "+timeline.mixture=" + _flow({"unit": "step", "points": [{"at": 0, "value": value}]}),
            f"scheduler.warmup_steps={warmup}", f"train.max_steps={steps}", *common]


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys in which two resolved configs differ.  A key one side lacks and the other sets to null or
    false is no difference: a block that does not declare a switch runs as if it were off."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                if not ((k not in a and b[k] in (None, False)) or (k not in b and a[k] in (None, False)))
                for d in config_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def anneal_table(rows: list[dict]) -> str:
    lines = ["| held-out schedule | predicted final loss | measured final loss | error | MAE over the curve "
             "(% of loss) | MAE, law anchored on the constant run | naive MAE (the fitted cosine run's curve) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']}: {r['what']} | {r['predicted_final']:.3f} | {r['measured_final']:.3f} | "
                     f"{r['final_error']:+.3f} | {r['mae']:.3f} ({r['mae_pct']:.2f}%) | {r['anchored_mae']:.3f} "
                     f"({r['anchored_final_error']:+.3f} at the end) | "
                     f"{r['naive_mae']:.3f} |")
    return "\n".join(lines)


def cmr_table(arms: list[dict], cmr: float, base: dict) -> str:
    lines = [f"| code ratio | general loss (base {base['general']:.3f}) | change | code loss (base {base['domain']:.3f}) "
             f"| change | feasible |", "|---|---|---|---|---|---|"]
    for a in sorted(arms, key=lambda a: a["ratio"]):
        label = f"{a['ratio']:.3f}" + (f" ({a['label']})" if a.get("label") else "")
        mark = "yes" if a["feasible"] else "no"
        mark += ", lowest code loss of the feasible arms" if a["best_feasible"] else ""
        lines.append(f"| {label} | {a['general']:.3f} | {a['general_change']:+.3f} | {a['domain']:.3f} | "
                     f"{a['domain'] - base['domain']:+.3f} | {mark} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ runs
def run(overrides: list[str], run_dir: Path, log: Path, reuse: bool) -> None:
    record = run_dir / "bench_overrides.json"
    if reuse and (run_dir / "summary.json").is_file() and record.is_file() \
            and json.loads(record.read_text()) == overrides:
        return
    cmd = [sys.executable, "-m", "effitrain.cli", *overrides, f"run_dir={run_dir}", "overwrite=true"]
    print(" ".join(cmd[2:]), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    record.write_text(json.dumps(overrides))


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _diff_beyond(a: Path, b: Path, allowed: Sequence[str]) -> list[str]:
    """Keys in which two runs' configs differ, other than those under ``allowed`` prefixes."""
    return [k for k in config_differences(_config(a), _config(b))
            if not any(k == p or k.startswith(p + ".") for p in allowed)]


def _eval_rows(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "eval_loss" in row:
            rows.append(row)
    return rows


def bench_anneal(args, out: Path) -> dict:
    from effitrain.curriculum import anneal_law
    from effitrain.curriculum.anneal_law_sweep import logged_losses, run_lrs

    n, seed = args.steps, args.seed
    common = [f"train.seed={seed}", "logger.progress_bar=false", "train.save_every=0", *args.overrides]
    fit_dir = out / "anneal-fit"
    run(["+recipe=anneal_law", f"stages.0.train.max_steps={n}", f"stages.0.train.log_every={args.log_every}",
         f"stages.0.sweep.predict_steps={n}", "stages.1.train.max_steps=20", *common],
        fit_dir, out / "anneal-fit.log", args.reuse)
    concluded = yaml.safe_load((fit_dir / "stages" / "01-fit" / "concluded.yaml").read_text())["record"]
    law = anneal_law.AnnealLaw.from_dict(concluded["law"], "concluded.yaml")
    members = {p.name.split("-")[-1]: p for p in sorted((fit_dir / "stages" / "01-fit" / "members").iterdir())}
    cosine_dir = members["cosine"]
    fit_from = int(0.1 * n)  # the sweep's default fit_from (10% of the run), so held-out windows match fitted ones

    def curve(run_dir: Path, warmup: Optional[int] = None):
        lrs, own_warmup = run_lrs(_config(run_dir))
        steps, losses = logged_losses(run_dir)
        c = anneal_law.curve_from_log(lrs, steps, losses, warmup_steps=own_warmup if warmup is None else warmup,
                                      decay_factor=law.decay_factor, fit_from=fit_from)
        return c, c.window_means(law.loss(c.s1, c.s2))

    plain = [f"train.max_steps={n}", f"train.log_every={args.log_every}", "train.eval_every=0",
             "train.save_final_model=false", *common]
    fitted_rows = []
    for name, d in members.items():
        c, pred = curve(d)
        fitted_rows.append({"name": name, **window_errors(pred, c.losses)})
    cosine_curve, _ = curve(cosine_dir)
    # every seed-0 run sees the same batches, so the windows' batch noise is common to them: the law's prediction
    # anchored on the constant run (its measured curve plus the law's difference between the two schedules)
    # cancels it, as the naive predictor (another run's measured curve) does
    constant_curve, constant_law = curve(members["constant"])

    noise_floor = None
    if args.noise:
        noise_dir = out / f"anneal-cosine-seed{seed + 1}"
        run(["scheduler=cosine", f"scheduler.warmup_steps={WARMUP}",
             *[f"train.seed={seed + 1}" if o == f"train.seed={seed}" else o for o in plain]],
            noise_dir, out / "anneal-noise.log", args.reuse)
        noise_curve, _ = curve(noise_dir)
        noise_floor = window_errors(noise_curve.losses, cosine_curve.losses)["mae"]

    rows, mismatches = [], {}
    for name, (what, overrides) in held_out(n).items():
        if name not in args.held_out:
            continue
        d = out / f"anneal-{name}"
        run([*overrides, *plain], d, out / f"anneal-{name}.log", args.reuse)
        extra = _diff_beyond(cosine_dir, d, ("scheduler", "timeline", "run_dir", "train.save_final_model", *NOT_TRAINING))
        if extra:
            mismatches[name] = extra
        c, pred = curve(d, warmup=WARMUP)  # the timeline scheduler's own warm-up count is 0; it warms up WARMUP steps
        errs = window_errors(pred, c.losses)
        anchored = window_errors(anchored_prediction(pred, constant_law, constant_curve.losses), c.losses)
        rows.append({"name": name, "what": what, "predicted_final": float(pred[-1]),
                     "measured_final": float(c.losses[-1]), **errs, "anchored_mae": anchored["mae"],
                     "anchored_final_error": anchored["final_error"],
                     "naive_mae": window_errors(cosine_curve.losses, c.losses)["mae"],
                     "windows": len(c.losses), "first_window_end": int(c.ends[0])})
    return {"law": concluded["law"], "r2": concluded["r2"], "fitted": fitted_rows, "rows": rows,
            "noise_floor": noise_floor, "mismatches": mismatches, "steps": n, "log_every": args.log_every,
            "seed": seed, "fit_from": fit_from}


def bench_cmr(args, out: Path) -> dict:
    seed = args.seed
    common = [f"train.seed={seed}", "logger.progress_bar=false", "train.save_every=0", *args.overrides]
    rec_dir = out / "cmr"
    run(["+recipe=cmr_law", *common], rec_dir, out / "cmr.log", args.reuse)
    concluded = yaml.safe_load((rec_dir / "stages" / "02-ratios" / "concluded.yaml").read_text())["record"]
    cmr, tolerance, shares = concluded["critical_mixture_ratio"], concluded["tolerance"], concluded["general_shares"]
    domain = concluded["domain"]
    main_dir = rec_dir / "stages" / "03-main"
    main_cfg = _config(main_dir)
    steps = int(main_cfg["train"]["max_steps"])
    main_rows = _eval_rows(main_dir)
    if main_rows[0].get("step") != 0:
        raise SystemExit(f"{main_dir}: no evaluation at step 0 (the base's losses are read from it)")
    base = {"general": general_loss(main_rows[0], shares), "domain": float(main_rows[0][f"eval_loss/{domain}"])}

    def arm(ratio: float, rows: list[dict], label: str) -> dict:
        last = rows[-1]
        g, dom = general_loss(last, shares), float(last[f"eval_loss/{domain}"])
        return {"ratio": ratio, "label": label, "general": g, "general_change": g - base["general"], "domain": dom,
                "step": int(last["step"])}

    arms = [arm(cmr, main_rows, "the CMR: the recipe's main stage")]
    mismatches = {}
    for ratio, label in cmr_arms(cmr, args.arms):
        d = out / f"cmr-ratio-{ratio:.4f}"
        overrides = arm_overrides(ratio, shares, domain, main_cfg["model"]["path"],
                                  main_cfg["scheduler"]["warmup_steps"], steps, common, main_cfg["model"])
        run(overrides, d, out / f"cmr-ratio-{ratio:.4f}.log", args.reuse)
        extra = _diff_beyond(main_dir, d, ("timeline.mixture", "run_dir", *NOT_TRAINING))
        if extra:
            mismatches[label] = extra
        arms.append(arm(ratio, _eval_rows(d), label))
    arms = arm_verdicts(arms, tolerance)
    return {"cmr": cmr, "tolerance": tolerance, "domain": domain, "shares": shares, "base": base, "arms": arms,
            "steps": steps, "seed": seed, "mismatches": mismatches,
            "members": [{k: m.get(k) for k in ("ratio", "general_change_last", "domain_change_last", "general_r2")}
                        for m in concluded["members"]], "cmr_law": concluded.get("cmr_law"),
            "budget_tokens": concluded["budget_tokens"]}


# ------------------------------------------------------------------------------------------------- writing
def anneal_text(a: dict) -> str:
    law = a["law"]
    fitted = ", ".join(f"{r['name']} {r['mae']:.3f} ({r['mae_pct']:.2f}%)" for r in a["fitted"])
    text = (f"**anneal_law** — fitted on the recipe's two runs (constant and cosine, {a['steps']} steps, a log line "
            f"every {a['log_every']} steps, seed {a['seed']}): `L = {law['L0']:.3f} + {law['A']:.3f}*S1^-"
            f"{law['alpha']:.3f} - {law['C']:.3f}*S2` (R^2 {a['r2']:.3f}; MAE on the fitted curves: {fitted}). "
            f"Each held-out schedule trains the same model on the same data and batches for {a['steps']} steps; "
            f"losses are training-loss log windows (the mean of {a['log_every']} steps) from step "
            f"{a['fit_from']}, the law's mean over the same steps beside them. Every run sees the same batches, so a "
            f"window's batch noise is common to all of them: the anchored column predicts the held-out curve as the "
            f"fitted constant run's measured curve plus the law's difference between the two schedules, which "
            f"cancels it, as the naive predictor (the fitted cosine run's measured curve) does. "
            + (f"Noise floor: a second seed of the cosine run differs from the first by MAE {a['noise_floor']:.3f}."
               if a["noise_floor"] is not None else "No second seed was run (`--no-noise`): no noise floor.")
            + "\n\n" + anneal_table(a["rows"]) + "\n")
    if a["mismatches"]:
        text += f"\nConfig differences beyond the scheduler (should be none): {a['mismatches']}\n"
    return text


def cmr_text(c: dict) -> str:
    members = ", ".join(f"{m['ratio']:g}: {m['general_change_last']:+.3f}" for m in c["members"])
    law = c.get("cmr_law")
    law_text = (f"; the CMR law fitted to the CMR at budgets inside the 30 steps (R^2 {law['r2']:.3f}) extrapolated "
                f"to {c['budget_tokens']:,} tokens" if law else "")
    text = (f"**cmr_law** — the recipe (seed {c['seed']}): after 30 continual steps the general-loss change was "
            f"{members} (code ratio: change){law_text}: **CMR {c['cmr']:.3f}** for {c['steps']} steps. Every arm "
            f"continues the same base for {c['steps']} steps; general loss = the general domains' eval losses "
            f"weighted by their token shares ({', '.join(f'{d} {w:.3f}' for d, w in c['shares'].items())}), "
            f"compared with the base's (the main stage's evaluation at step 0); feasible = the general loss rose "
            f"by at most {c['tolerance']}.\n\n" + cmr_table(c["arms"], c["cmr"], c["base"]) + "\n")
    if c["mismatches"]:
        text += f"\nConfig differences beyond the mixture (should be none): {c['mismatches']}\n"
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("anneal", "cmr"), default=None)
    ap.add_argument("--steps", type=int, default=300, help="length of every anneal_law run (fitted and held-out)")
    ap.add_argument("--log-every", type=int, default=10, help="anneal_law runs' log window (steps)")
    ap.add_argument("--held-out", nargs="+", default=list(held_out(1)), choices=list(held_out(1)),
                    help="anneal_law's held-out schedules to run")
    ap.add_argument("--no-noise", dest="noise", action="store_false",
                    help="skip anneal_law's second-seed cosine run (the noise floor)")
    ap.add_argument("--arms", nargs="+", type=float, default=[0.0, 0.5, 2.0, 1.0], metavar="X",
                    help="cmr_law's arms besides the CMR: 0 = all general, 1 = all code, 0.5 and 2 = that multiple "
                         "of the CMR (2x past 1 becomes halfway from the CMR to 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_laws")
    ap.add_argument("--reuse", action="store_true", help="skip runs whose run dir finished with the same overrides")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose section to replace")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict[str, Any] = {}
    if args.only in (None, "anneal"):
        results["anneal"] = bench_anneal(args, args.out)
    if args.only in (None, "cmr"):
        results["cmr"] = bench_cmr(args, args.out)
    results["wall_seconds"] = time.time() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    parts = [anneal_text(results["anneal"])] if "anneal" in results else []
    parts += [cmr_text(results["cmr"])] if "cmr" in results else []
    print("\n".join(parts))
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_laws.py " + " ".join(
            [*([f"--only {args.only}"] if args.only else []), f"--steps {args.steps}",
             f"--log-every {args.log_every}",
             *([f"--held-out {' '.join(args.held_out)}"] if args.held_out != list(held_out(1)) else []),
             *([] if args.noise else ["--no-noise"]),
             *([f"--arms {' '.join(f'{x:g}' for x in args.arms)}"] if args.arms != [0.0, 0.5, 2.0, 1.0] else []),
             f"--seed {args.seed}", *args.overrides, f"--write {args.write}"])
        body = (f"{SECTION_TITLE}\n\n{SECTION_START}\n"
                f"Each law's recipe runs as shipped through the CLI (`tiny_llama`, the demo corpus), then the runs "
                f"it did not see train with the same config; one seed. Machine: {platform.machine()}, "
                f"{os.cpu_count()} CPU cores, Python {platform.python_version()}.\n\n```\n{cmd}\n```\n\n"
                + "\n".join(parts))
        body = with_reading(body, __file__)
        body += f"{SECTION_END}\n"
        replace_marked_section(args.write, f"{SECTION_TITLE}\n\n{SECTION_START}", SECTION_END, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
