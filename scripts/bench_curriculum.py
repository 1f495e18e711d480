#!/usr/bin/env python
"""Curricula and mixtures against the shuffled baseline: tokens to a target loss and final per-domain eval losses.

Every arm trains the default ``tiny_llama`` on the demo corpus through the real ``effitrain`` CLI for the same number
of optimizer steps (so the same training tokens: every recipe keeps tokens per step constant), with the same seed and
evaluation points.  The target is the shuffled baseline's final eval loss; an arm's "tokens to target" is the first
evaluation point at which its eval loss is at or below it (linear interpolation between evaluation points is not
used: the figure is the evaluated point), "not reached" otherwise.  Per-domain losses are mean token losses on the
untouched eval split at the end of the run (for a recipe with stages, at the end of its last stage; the tokens of
all its stages are counted, proxy runs included, and listed separately; regmix's proxies train a quarter of the
main run's steps each).  ``cpt_stability_gap`` is not an arm: it continues a pretraining stage on chosen data, so
"the same tokens from scratch" does not describe it.

    python scripts/bench_curriculum.py                                  # every arm, 400 steps, seed 0
    python scripts/bench_curriculum.py --arms baseline meco --steps 200
    python scripts/bench_curriculum.py --write docs/benchmarks.md       # replace the "Curricula" section

Extra ``key=value`` arguments are passed to every run.  On a shared CPU machine use ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import replace_marked_section, with_reading  # noqa: E402

SECTION_START = "<!-- bench_curriculum:start -->"
SECTION_END = "<!-- bench_curriculum:end -->"

# arm -> the overrides that make it (each is a shipped recipe, run as a user would run it)
ARMS: dict[str, list[str]] = {
    "baseline": ["+recipe=baseline"],
    "dataset_decomposition": ["+recipe=dataset_decomposition"],
    "difficulty_curriculum": ["+recipe=difficulty_curriculum"],
    "quality_curriculum_avg": ["+recipe=quality_curriculum_avg"],
    "in_context_pretraining": ["+recipe=in_context_pretraining"],
    "skill_it": ["+recipe=skill_it"],
    "loss_reweighting": ["+recipe=loss_reweighting"],
    "regmix": ["+recipe=regmix"],
    "meco": ["+recipe=meco"],
    "procedural_warmup": ["+recipe=procedural_warmup"],
    "seta": ["+recipe=seta"],
    "delt": ["+recipe=delt"],
    "domain_upsampling": ["+recipe=domain_upsampling"],
    # rows of 512 tokens, 4 a step (its recipe): compare with the baseline at the same shapes (the arm below)
    "untie_knots": ["+recipe=untie_knots"],
    "baseline_512": ["+recipe=baseline", "dataset.seq_len=512", "train.micro_batch_size=4"],
}


# set after the common overrides (a stage-specific key wins over the run length given to every stage): regmix's 16
# proxies at the main run's length would cost 16 times the main run; the bench gives them a quarter of it each
ARM_TAIL: dict[str, list[str]] = {
    "regmix": ["stages.0.train.max_steps={proxy_steps}"],
}


def run(overrides: list[str], run_dir: Path, log: Path) -> None:
    cmd = [sys.executable, "-m", "effitrain.cli", *overrides, f"run_dir={run_dir}", "overwrite=true"]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _metric_files(run_dir: Path) -> list[Path]:
    """The metrics of a run in training order: one file, or one per stage (stages/NN-name/, and any runs inside a
    stage such as proxy sweeps, whose tokens count too)."""
    if (run_dir / "metrics.jsonl").is_file():
        return [run_dir / "metrics.jsonl"]
    return sorted(run_dir.glob("stages/*/**/metrics.jsonl"))


def curve(run_dir: Path) -> dict:
    """Eval points (cumulative training tokens, eval loss) over every stage, the last stage's final per-domain
    losses, and the tokens of stages before the last (proxy runs, pretraining stages)."""
    points, offset, last, files = [], 0, {}, _metric_files(run_dir)
    for i, path in enumerate(files):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
        tokens = max((r.get("tokens", 0) for r in rows), default=0)
        is_last = i == len(files) - 1
        for r in rows:
            if "eval_loss" in r and is_last:
                points.append((offset + r["tokens"], r["eval_loss"]))
                last = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("eval_loss/")}
                last["all"] = r["eval_loss"]
        if not is_last:
            offset += tokens
    return {"points": points, "final": last, "tokens_before": offset,
            "tokens": points[-1][0] if points else offset}


def tokens_to(points: list[tuple[int, float]], target: float):
    return next((t for t, loss in points if loss <= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help="arms to run (baseline first: it sets the target)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=20, help="must divide skill_it's update_every (40)")
    ap.add_argument("--docs-per-domain", type=int, default=200,
                    help="a smaller demo corpus, so the run covers ~3 epochs: SeTa's window moves once per epoch and "
                         "DELT's folds are one pass")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_curriculum")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose section to replace")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    arms = ["baseline"] + [a for a in args.arms if a != "baseline"]
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict]] = {a: [] for a in arms}
    failures: dict[str, str] = {}
    for seed in args.seeds:
        for arm in arms:
            common = [f"dataset.max_docs_per_domain={args.docs_per_domain}", f"train.max_steps={args.steps}",
                      f"train.eval_every={args.eval_every}", "train.save_every=0",
                      f"train.seed={seed}", "logger.progress_bar=false", *args.overrides]
            tag = arm.split(" ")[0] + f"-seed{seed}"
            print(f"{arm}, seed {seed}: training", flush=True)
            try:
                tail = [t.format(proxy_steps=max(args.steps // 4, 1)) for t in ARM_TAIL.get(arm, [])]
                run([*ARMS[arm], *common, *tail], args.out / tag, args.out / f"{tag}.log")
            except RuntimeError as exc:
                failures[arm] = str(exc).splitlines()[-1]
                print(exc, file=sys.stderr)
                continue
            results[arm].append(curve(args.out / tag))
    (args.out / "results.json").write_text(json.dumps({"results": results, "failures": failures}, indent=1))

    if not results["baseline"]:
        raise SystemExit("the baseline did not run; no target")
    rows, domains = [], sorted(k for k in results["baseline"][0]["final"] if k != "all") + ["all"]
    for arm in arms:
        runs = results[arm]
        if not runs:
            rows.append(f"| {arm} | failed: {failures.get(arm, '?')} |" + " |" * (len(domains) + 1))
            continue
        reached = []
        for seed_index, r in enumerate(runs):
            target = results["baseline"][seed_index]["final"]["all"]
            reached.append(tokens_to(r["points"], target))
        to_target = ("not reached" if any(t is None for t in reached)
                     else f"{statistics.median(reached) / 1e3:.0f}k")
        extra = statistics.mean(r["tokens_before"] for r in runs)
        rows.append(f"| {arm} | {to_target} | {extra / 1e3:.0f}k | " + " | ".join(
            f"{statistics.mean(r['final'].get(d, float('nan')) for r in runs):.3f}" for d in domains) + " |")
    header = ("| arm | tokens to baseline's final loss | tokens in earlier stages | "
              + " | ".join(f"{d}" for d in domains) + " |")
    table = "\n".join([header, "|---|---|---|" + "---|" * len(domains), *rows])
    print(table)
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_curriculum.py " + " ".join(
            [f"--steps {args.steps}", f"--eval-every {args.eval_every}", f"--docs-per-domain {args.docs_per_domain}",
             "--seeds " + " ".join(map(str, args.seeds)),
             *(["--arms " + " ".join(f"'{a}'" if " " in a else a for a in args.arms)]
               if args.arms != list(ARMS) else []),
             *args.overrides, f"--write {args.write}"])
        body = (f"## Curricula and mixtures\n\n{SECTION_START}\n"
                f"Each arm is a shipped recipe run through the CLI with the default `tiny_llama` on the demo corpus, "
                f"{args.docs_per_domain} documents per domain, {args.steps} optimizer steps, evaluation every "
                f"{args.eval_every} steps, seeds "
                f"{', '.join(map(str, args.seeds))} (means of final losses, median of tokens to target). The target "
                f"is the shuffled baseline's final eval loss. Per-domain columns: mean token loss on the eval split "
                f"at the end of the (last stage of the) run. Machine: {platform.machine()}, {os.cpu_count()} CPU "
                f"cores, Python {platform.python_version()}.\n\n```\n{cmd}\n```\n\n{table}\n")
        body = with_reading(body, __file__)
        body += f"{SECTION_END}\n"
        replace_marked_section(args.write, f"## Curricula and mixtures\n\n{SECTION_START}", SECTION_END, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
