#!/usr/bin/env python
"""Architecture methods against the dense baseline at equal training FLOPs.

Every arm is a shipped recipe run through the real ``effitrain`` CLI with the default ``tiny_llama`` on the demo
corpus, the same seed and data.  The baseline trains ``--steps`` optimizer steps; its training FLOPs (summary.json
``flops``: 6N + attention per token, or the method's own true count where it differs) are the budget.  An arm's step
counts are its recipe's (every stage's ``train.max_steps``) scaled by one factor so that its training FLOPs match the
budget: a short probe run (``--probe-steps`` per stage) measures each stage's FLOPs per step, the factor follows, and
the table shows the FLOPs the arm really used (as a multiple of the budget), so a method whose cost per step changes
during training (a decaying dense guide, a sampled sub-network) is not hidden behind the probe's estimate.

Columns: final eval loss (the last stage's model on the untouched eval split, mean token loss; per domain), total
parameters and training FLOPs per token of the final model (summary.json), and training tokens/s of the last stage
(on this shared CPU, a ratio to the baseline's is the meaningful figure).

    python scripts/bench_architecture.py                                 # every arm, baseline 300 steps, seed 0
    python scripts/bench_architecture.py --arms baseline monarch --steps 100
    python scripts/bench_architecture.py --write docs/benchmarks.md      # replace the "Architecture" section

Extra ``key=value`` arguments are passed to every run.  On a shared CPU machine use ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section, with_reading  # noqa: E402

SECTION_START = "<!-- bench_architecture:start -->"
SECTION_END = "<!-- bench_architecture:end -->"
TITLE = "## Architecture methods at equal training FLOPs"

# arm -> recipe (each a shipped recipe, run as a user would run it)
ARMS: dict[str, str] = {
    "baseline": "baseline",
    "spdf": "spdf",
    "g_stack": "g_stack",
    "sorted_llama": "sorted_llama",
    "sortednet": "sortednet",
    "structured_ffn": "structured_ffn",
    "monarch": "monarch",
    "moe_upcycle": "moe_upcycle",
    "sparse_spectral": "sparse_spectral",
    "vcycle": "vcycle",
}


def recipe_stage_steps(recipe: str) -> list[int] | None:
    """The recipe's own ``train.max_steps`` of every stage (None for a one-run recipe: it gets the baseline's)."""
    data = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text()) or {}
    stages = data.get("stages")
    if not stages:
        return None
    default = (data.get("train") or {}).get("max_steps")
    steps = [((s.get("train") or {}).get("max_steps") or default) for s in stages]
    if any(s is None for s in steps):
        raise SystemExit(f"recipe {recipe}: every stage needs train.max_steps for the bench to scale it")
    return [int(s) for s in steps]


def step_overrides(steps: int | list[int]) -> list[str]:
    if isinstance(steps, int):
        return [f"train.max_steps={steps}"]
    return [f"stages.{i}.train.max_steps={n}" for i, n in enumerate(steps)]


REUSE = False   # --reuse: read back a finished run whose overrides were exactly these


def run(overrides: list[str], run_dir: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "effitrain.cli", *overrides, f"run_dir={run_dir}", "overwrite=true"]
    record = run_dir.parent / f"{run_dir.name}.overrides.json"
    if REUSE and record.is_file() and json.loads(record.read_text()) == overrides and \
            (run_dir / "summary.json").is_file() and json.loads((run_dir / "summary.json").read_text()).get("finished"):
        return json.loads((run_dir / "summary.json").read_text())
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    record.write_text(json.dumps(overrides))
    return json.loads((run_dir / "summary.json").read_text())


def stage_summaries(run_dir: Path, summary: dict) -> list[dict]:
    """Each stage's own summary.json (the pipeline's rows lack per-domain losses and throughput); the run itself
    for a one-run recipe."""
    if "stages" not in summary:
        return [summary]
    return [json.loads((Path(row["run_dir"]) / "summary.json").read_text()) for row in summary["stages"]]


def flops_per_step(run_dir: Path, summary: dict) -> list[float]:
    return [s["flops"] / max(s["steps"], 1) for s in stage_summaries(run_dir, summary)]


def measure(run_dir: Path, summary: dict) -> dict:
    stages = stage_summaries(run_dir, summary)
    last = stages[-1]
    return {"flops": sum(s["flops"] for s in stages),
            "flops_sparse": sum(s.get("flops_sparse") or s["flops"] for s in stages), "steps": [s["steps"] for s in stages],
            "eval_loss": last.get("final_eval_loss"), "eval_losses": last.get("eval_losses", {}),
            "params": last.get("total_params"), "flops_per_token": last["flops"] / max(last["tokens"], 1),
            "tokens_per_s": last.get("tokens_per_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help="arms to run (baseline first: it sets the budget)")
    ap.add_argument("--steps", type=int, default=300, help="the baseline's optimizer steps")
    ap.add_argument("--probe-steps", type=int, default=8, help="steps per stage of the FLOPs probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_architecture")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose section to replace")
    ap.add_argument("--reuse", action="store_true", help="read back finished runs (probes included) whose overrides "
                                                         "are exactly the same instead of training them again")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    arms = ["baseline"] + [a for a in args.arms if a != "baseline"]
    missing = [a for a in arms if not (REPO / "recipes" / f"{ARMS[a]}.yaml").is_file()]
    if missing:
        raise SystemExit(f"no recipe for arm(s) {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["train.save_every=0", f"train.seed={args.seed}", "logger.progress_bar=false", *args.overrides]

    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    budget = None
    for arm in arms:
        recipe = [f"+recipe={ARMS[arm]}"]
        stage_steps = recipe_stage_steps(ARMS[arm])
        try:
            if arm == "baseline":
                steps: int | list[int] = args.steps
            else:
                probe = args.probe_steps if stage_steps is None else [args.probe_steps] * len(stage_steps)
                print(f"{arm}: probing FLOPs per step", flush=True)
                probe_dir = args.out / f"{arm}-probe"
                per_step = flops_per_step(probe_dir, run([*recipe, *step_overrides(probe), *common], probe_dir,
                                                         args.out / f"{arm}-probe.log"))
                planned = [args.steps] if stage_steps is None else stage_steps
                factor = budget / sum(n * f for n, f in zip(planned, per_step))
                scaled = [max(1, round(n * factor)) for n in planned]
                steps = scaled[0] if stage_steps is None else scaled
            print(f"{arm}: training {steps} steps", flush=True)
            summary = run([*recipe, *step_overrides(steps), *common], args.out / arm, args.out / f"{arm}.log")
        except RuntimeError as exc:
            failures[arm] = str(exc).splitlines()[-1]
            print(exc, file=sys.stderr)
            if arm == "baseline":
                raise SystemExit("the baseline did not run; no budget")
            continue
        results[arm] = measure(args.out / arm, summary)
        if arm == "baseline":
            budget = results[arm]["flops"]
    (args.out / "results.json").write_text(json.dumps({"results": results, "failures": failures}, indent=1))

    base = results["baseline"]
    domains = sorted(base["eval_losses"])
    header = ("| arm | steps | FLOPs (× baseline) | zeros skipped (× baseline) | params | FLOPs/token | tokens/s (× baseline) | eval loss | "
              + " | ".join(domains) + " |")
    rows = [header, "|---|---|---|---|---|---|---|---|" + "---|" * len(domains)]
    for arm in arms:
        if arm not in results:
            rows.append(f"| {arm} | failed: {failures.get(arm, '?')} |" + " |" * (6 + len(domains)))
            continue
        r = results[arm]
        speed = (f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if r["tokens_per_s"] and base["tokens_per_s"]
                 else "–")
        rows.append(f"| {arm} | {' + '.join(map(str, r['steps']))} | {r['flops'] / budget:.2f} | {r['flops_sparse'] / budget:.2f} | "
                    f"{r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M | {speed} | "
                    f"{r['eval_loss']:.3f} | "
                    + " | ".join(f"{r['eval_losses'][d]:.3f}" if d in r["eval_losses"] else "–" for d in domains)
                    + " |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_architecture.py " + " ".join(
            [f"--steps {args.steps}", f"--probe-steps {args.probe_steps}", f"--seed {args.seed}",
             *(["--arms " + " ".join(args.arms)] if args.arms != list(ARMS) else []),
             *args.overrides, f"--write {args.write}"])
        body = (f"{TITLE}\n\n{SECTION_START}\n"
                f"Each arm is a shipped recipe run through the CLI with the default `tiny_llama` on the demo corpus, "
                f"seed {args.seed}. The dense baseline trains {args.steps} steps; every other arm's steps (of each "
                f"stage) are its recipe's scaled to the baseline's training FLOPs, and the FLOPs column is what it "
                f"really used (`zeros skipped`: the same counting masked weights as skipped, the accounting of sparse-training papers on hardware that skips zeros; no kernel here does). `eval loss`: the final model's mean token loss on the eval split of the domains its "
                f"last stage evaluates (spdf's dense stage fine-tunes and evaluates on `code` only). Machine: "
                f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.\n\n"
                f"```\n{cmd}\n```\n\n{table}\n")
        body = with_reading(body, __file__)
        body += f"{SECTION_END}\n"
        replace_marked_section(args.write, f"{TITLE}\n\n{SECTION_START}", SECTION_END, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
