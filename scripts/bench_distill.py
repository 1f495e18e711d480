#!/usr/bin/env python
"""The distillation recipes of issue #14 against their baselines on the demo corpus (tiny Llamas, CPU).

* ``kd_torchdistill``: the recipe (a teacher trained first, then a student with logit KD plus torchdistill's hint,
  attention-transfer and PKT terms), against students trained for the same steps with the same seed and data order
  from the *same teacher folder* with logit KD alone (T = 1, alpha = 0.5, as the recipe), and without a teacher
  (objective causal_lm).
* ``salt``: the recipe (SLM trained first; the larger LM distils from it on the SLM-selected band for its first
  100 steps with the weight decaying to 0, then 500 next-token steps), against the same larger LM trained 600 steps
  on next tokens alone (and, with ``--no-selection-variant``, SALT without data selection: ``stages.1.selection=none``).  The SLM's
  cost is reported, not hidden.

Each run is the real ``effitrain`` CLI; the figure is the final held-out loss (mean over the demo's domains).

    python scripts/bench_distill.py                      # both, seed 0
    python scripts/bench_distill.py --only salt --seeds 0 1 --no-selection-variant
    python scripts/bench_distill.py --reuse --write docs/benchmarks.md

Run with ``OMP_NUM_THREADS=1`` on a shared CPU machine.  Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_growth  # noqa: E402  (its `run`: one CLI run, read back with --reuse)

REPO = Path(__file__).resolve().parents[1]
SECTION_START = "<!-- bench_distill:start -->"
SECTION_END = "<!-- bench_distill:end -->"
LLM = ["model.hidden_size=256", "model.intermediate_size=704", "model.num_layers=6"]  # salt's stage-2 model


def bench_kd_torchdistill(args, extra: list[str], out: Path) -> list[str]:
    rows = []
    for seed in args.seeds:
        common = [f"train.seed={seed}", *extra]
        pipeline = bench_growth.run(["+recipe=kd_torchdistill", *common], out / f"kdt-s{seed}")
        teacher, student = pipeline["stages"]
        folder = out / f"kdt-s{seed}" / "stages" / "01-teacher" / "final_model"
        steps = [f"train.max_steps={student['steps']}"]
        kd_only = bench_growth.run(["objective=distill", f"objective.teacher={folder}", "objective.temperature=1.0",
                                    "objective.alpha=0.5", *steps, *common], out / f"kd-only-s{seed}")
        alone = bench_growth.run([*steps, *common], out / f"alone-s{seed}")
        rows.append({"seed": seed, "teacher": teacher["final_eval_loss"], "all": student["final_eval_loss"],
                     "kd_only": kd_only["final_eval_loss"], "alone": alone["final_eval_loss"],
                     "steps": student["steps"]})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "seed"}
    return [
        "### kd_torchdistill: torchdistill's intermediate terms on top of logit KD",
        "",
        f"`{args.command}` — {len(rows)} seed(s), medians; {rows[0]['steps']} student steps each, one teacher "
        f"(stage 1 of the recipe) for all three students.",
        "",
        "| student | final eval loss |",
        "|---|---|",
        f"| KD + hint + AT + PKT (the recipe's stage 2) | {med['all']:.4f} |",
        f"| logit KD only (T = 1, α = 0.5) | {med['kd_only']:.4f} |",
        f"| no teacher (objective causal_lm) | {med['alone']:.4f} |",
        f"| (the teacher itself) | {med['teacher']:.4f} |",
        "",
    ]


def bench_salt(args, extra: list[str], out: Path) -> list[str]:
    rows = []
    for seed in args.seeds:
        common = [f"train.seed={seed}", *extra]
        salt = bench_growth.run(["+recipe=salt", *common], out / f"salt-s{seed}")
        no_ds = bench_growth.run(["+recipe=salt", "stages.1.selection=none", *common], out / f"salt-nods-s{seed}") \
            if args.no_selection_variant else {"final_eval_loss": float("nan")}
        slm, kd, llm = salt["stages"]
        llm_steps = kd["steps"] + llm["steps"]
        baseline = bench_growth.run([*LLM, f"train.max_steps={llm_steps}", *common], out / f"llm-alone-s{seed}")
        rows.append({"seed": seed, "slm": slm["final_eval_loss"], "salt": salt["final_eval_loss"],
                     "salt_kd_phase": kd["final_eval_loss"], "no_ds": no_ds["final_eval_loss"],
                     "baseline": baseline["final_eval_loss"], "llm_steps": llm_steps, "kd_steps": kd["steps"],
                     "slm_flops": slm["flops"], "llm_flops": kd["flops"] + llm["flops"],
                     "baseline_flops": baseline["flops"]})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "seed"}
    r0 = rows[0]
    return [
        "### salt: a small LM's soft labels early in a larger LM's training",
        "",
        f"`{args.command}` — {len(rows)} seed(s), medians. The LLM trains {r0['llm_steps']} steps in every row; "
        f"in SALT its first {r0['kd_steps']} distil from the SLM.",
        "",
        "| run | final eval loss | training FLOPs |",
        "|---|---|---|",
        f"| SLM (stage 1 of salt) | {med['slm']:.4f} | {r0['slm_flops']:.3g} |",
        f"| SALT_DS: LLM after KD on the SLM's band, then next-token training | {med['salt']:.4f} | "
        f"{r0['llm_flops']:.3g} (+ the SLM's, + its forward passes in the KD phase) |",
        *([f"| SALT without selection (`stages.1.selection=none`) | {med['no_ds']:.4f} | {r0['llm_flops']:.3g} "
           f"(+ the same) |"] if args.no_selection_variant else []),
        f"| LLM alone, next-token loss | {med['baseline']:.4f} | {r0['baseline_flops']:.3g} |",
        f"| (SALT_DS's LLM at the end of the KD phase) | {med['salt_kd_phase']:.4f} | |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("kd_torchdistill", "salt"), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-selection-variant", action="store_true",
                        help="also run SALT without data selection (one more three-stage pipeline)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_distill")
    parser.add_argument("--reuse", action="store_true", help="read back finished runs with the same overrides")
    parser.add_argument("--write", type=Path, default=None, help="replace the section between the markers in FILE")
    args, extra = parser.parse_known_args()
    bench_growth.REUSE = args.reuse
    args.command = "python scripts/bench_distill.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--write") and a != str(args.write))
    lines = [SECTION_START, "", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch CPU; {date.today()}.", ""]
    if args.only in (None, "kd_torchdistill"):
        lines += bench_kd_torchdistill(args, extra, args.out)
    if args.only in (None, "salt"):
        lines += bench_salt(args, extra, args.out)
    lines.append(SECTION_END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        doc = args.write.read_text()
        start, end = doc.find(SECTION_START), doc.find(SECTION_END)
        if start < 0 or end < 0:
            raise SystemExit(f"{args.write}: no {SECTION_START} ... {SECTION_END} section")
        args.write.write_text(doc[:start] + text + doc[end + len(SECTION_END):])


if __name__ == "__main__":
    main()
