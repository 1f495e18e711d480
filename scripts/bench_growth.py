#!/usr/bin/env python
"""Stages that hand a model on, against training without them, on the demo corpus (tiny Llama, CPU).

* ``gstack``: the ``g_stack`` recipe (a 1-layer model trained ``--small-steps``, stacked x4 and trained
  ``--stacked-steps`` at full depth) against the 4-layer model trained from scratch for the *same total training
  FLOPs* (the steps that spend the pipeline's FLOPs at the large model's FLOPs per step), and for the same number of
  full-depth steps (the comparison that ignores the small stage's cost).  FLOPs are the runs' own ``flops`` (6N per
  token plus attention, effitrain.engine.metrics.flops_per_token, N including embeddings).
* ``kd``: the ``kd`` recipe (a teacher trained first, then a student distilled from it) against the same student
  trained on the hard labels alone (the base config: same model, seed, data order and steps, objective causal_lm);
  the teacher's cost is reported, not hidden.

Each comparison runs the real ``effitrain`` CLI once per seed and reports the final held-out loss (mean over the
demo's domains) with the median over seeds.

    python scripts/bench_growth.py                          # both, seed 0
    python scripts/bench_growth.py --only gstack --seeds 0 1 2
    python scripts/bench_growth.py --write docs/benchmarks.md
    python scripts/bench_growth.py --reuse ...              # finished runs with the same overrides are read back

Run with ``OMP_NUM_THREADS=1`` on a shared CPU machine.  Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION_START = "<!-- bench_growth:start -->"
SECTION_END = "<!-- bench_growth:end -->"
REUSE = False


def run(overrides: list[str], run_dir: Path) -> dict:
    """One run through the CLI; a finished run with the same overrides (``--reuse``) is read back instead."""
    record = run_dir / "bench_overrides.json"
    if REUSE and (run_dir / "summary.json").is_file() and record.is_file() \
            and json.loads(record.read_text()) == overrides:
        return json.loads((run_dir / "summary.json").read_text())
    cmd = [sys.executable, "-m", "effitrain.cli", *overrides, f"run_dir={run_dir}", "overwrite=true"]
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    summary = json.loads((run_dir / "summary.json").read_text())
    record.write_text(json.dumps(overrides))
    summary["wall_seconds"] = time.time() - t0
    return summary


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(l["step"], l["eval_loss"]) for l in lines if "eval_loss" in l]


def bench_gstack(args, extra: list[str], out: Path) -> list[str]:
    rows = []
    for seed in args.seeds:
        common = [f"train.seed={seed}", *extra]
        pipeline = run(["+recipe=g_stack", f"stages.0.train.max_steps={args.small_steps}",
                        f"stages.1.train.max_steps={args.stacked_steps}", *common], out / f"gstack-s{seed}")
        small, stacked = pipeline["stages"]
        per_step_large = stacked["flops"] / stacked["steps"]
        equal_flops_steps = round(pipeline["totals"]["flops"] / per_step_large)
        scratch = run([f"train.max_steps={equal_flops_steps}", *common], out / f"scratch-flops-s{seed}")
        same_steps = run([f"train.max_steps={args.stacked_steps}", *common], out / f"scratch-steps-s{seed}")
        rows.append({"seed": seed, "gstack": pipeline["final_eval_loss"], "small_flops": small["flops"],
                     "total_flops": pipeline["totals"]["flops"], "scratch_steps": equal_flops_steps,
                     "scratch_flops": scratch["flops"], "scratch": scratch["final_eval_loss"],
                     "scratch_same_steps": same_steps["final_eval_loss"], "same_steps_flops": same_steps["flops"]})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("gstack", "scratch", "scratch_same_steps")}
    r0 = rows[0]
    lines = [
        "### G_stack vs training the large model from scratch",
        "",
        f"`{args.command}` — {len(rows)} seed(s) ({', '.join(map(str, args.seeds))}), medians.  The g_stack recipe: "
        f"1-layer model {args.small_steps} steps, stacked x4, then {args.stacked_steps} steps at 4 layers.",
        "",
        "| run | steps at 4 layers | training FLOPs | final eval loss |",
        "|---|---|---|---|",
        f"| g_stack (small stage + stacked stage) | {args.stacked_steps} (+{args.small_steps} at 1 layer) | "
        f"{r0['total_flops']:.3g} | {med['gstack']:.4f} |",
        f"| from scratch, same total FLOPs | {r0['scratch_steps']} | {r0['scratch_flops']:.3g} | {med['scratch']:.4f} |",
        f"| from scratch, same full-depth steps | {args.stacked_steps} | {r0['same_steps_flops']:.3g} | "
        f"{med['scratch_same_steps']:.4f} |",
        "",
        "Per seed: " + "; ".join(f"seed {r['seed']}: g_stack {r['gstack']:.4f}, scratch at equal FLOPs "
                                 f"{r['scratch']:.4f}" for r in rows) + ".",
        "",
    ]
    return lines


def bench_kd(args, extra: list[str], out: Path) -> list[str]:
    rows = []
    for seed in args.kd_seeds or args.seeds:
        common = [f"train.seed={seed}", *extra]
        pipeline = run(["+recipe=kd", f"stages.1.train.max_steps={args.student_steps}", *common], out / f"kd-s{seed}")
        teacher, student = pipeline["stages"]
        # the student stage's config without the teacher: the base config, same seed, same steps
        alone = run([f"train.max_steps={args.student_steps}", *common], out / f"student-alone-s{seed}")
        rows.append({"seed": seed, "teacher": teacher["final_eval_loss"], "teacher_flops": teacher["flops"],
                     "kd": student["final_eval_loss"], "alone": alone["final_eval_loss"],
                     "student_flops": student["flops"]})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("teacher", "kd", "alone")}
    return [
        "### kd: a distilled student vs the same student without a teacher",
        "",
        f"`{args.command}` — {len(rows)} seed(s), medians; {args.student_steps} student steps each.",
        "",
        "| run | final eval loss | training FLOPs |",
        "|---|---|---|",
        f"| teacher (stage 1 of kd) | {med['teacher']:.4f} | {rows[0]['teacher_flops']:.3g} |",
        f"| student distilled from it (stage 2 of kd) | {med['kd']:.4f} | {rows[0]['student_flops']:.3g} "
        f"(+ the teacher's forward passes) |",
        f"| student alone (objective causal_lm) | {med['alone']:.4f} | {rows[0]['student_flops']:.3g} |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("gstack", "kd"), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kd-seeds", type=int, nargs="+", default=None, help="seeds of the kd comparison "
                        "(default: --seeds); its teacher stage makes it the slower one")
    parser.add_argument("--small-steps", type=int, default=50)
    parser.add_argument("--stacked-steps", type=int, default=200)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_growth")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="read back finished runs with the same overrides")
    args, extra = parser.parse_known_args()
    global REUSE
    REUSE = args.reuse
    args.command = "python scripts/bench_growth.py " + " ".join(sys.argv[1:])
    sections = []
    if args.only in (None, "gstack"):
        sections += bench_gstack(args, extra, args.out)
    if args.only in (None, "kd"):
        sections += bench_kd(args, extra, args.out)
    text = "\n".join([SECTION_START, "## Stages: growth and distillation", "",
                      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch CPU; "
                      f"{time.strftime('%Y-%m-%d')}.", "", *sections, SECTION_END])
    print(text)
    if args.write:
        sys.path.insert(0, str(REPO / "scripts"))
        from _sections import replace_marked_section

        replace_marked_section(args.write, SECTION_START, SECTION_END, text)


if __name__ == "__main__":
    main()
