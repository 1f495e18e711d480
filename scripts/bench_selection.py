#!/usr/bin/env python
"""Data selection against random at the same budget: target-domain and general eval loss after the same training.

* pool: the demo corpus (train split); target: ``--target-examples`` documents of one domain (``--target``), drawn
  from the pool's train split and held out of it (``selection.target.split=train``), so every method selects from
  the same candidates and the eval split stays untouched;
* budget: ``--fraction`` of the pool's tokens (pre-tokenizer word pieces, see ``BudgetParams``);
* every selection trains the same model for the same ``--steps`` through the real ``effitrain`` CLI.  All runs use
  the tokenizer of the full-pool run (``model.tokenizer=<full>/final_model``): a BPE trained on each selection would
  make the per-token losses incomparable.  Every method runs with its recipe's defaults: ``perplexity``,
  ``diversity_kmeans`` and ``less`` use the byte-level proxy trained on the pool (one, cached, shared);
  ``--reference-full`` gives the first two the full-pool run's final model instead (the table before 2026-11-28).

    python scripts/bench_selection.py                                   # all methods, 200 steps, target prose
    python scripts/bench_selection.py --methods random dsir zip_fit --steps 100
    python scripts/bench_selection.py --write docs/benchmarks.md        # replace the "Data selection" section

Extra ``key=value`` arguments are passed to every run (e.g. ``dataset.max_docs_per_domain=500``).  On a shared CPU
machine run it with ``OMP_NUM_THREADS=1``: the tiny model gains nothing from intra-op threads and loses up to 10x to
contention.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import with_reading  # noqa: E402

METHODS = ("random", "dsir", "zip_fit", "quality_classifier", "less", "s2l", "perplexity", "diversity_kmeans", "dedup",
           "rds_plus", "ingenious", "got_d")
NEEDS_REFERENCE = ("perplexity", "diversity_kmeans")
SECTION_START = "<!-- bench_selection:start -->"
SECTION_END = "<!-- bench_selection:end -->"


def run(overrides: list[str], run_dir: Path, log: Path, reuse: bool = False) -> dict:
    record = run_dir / "bench_overrides.json"
    if reuse and (run_dir / "summary.json").is_file() and record.is_file() \
            and json.loads(record.read_text()) == overrides:
        return json.loads((run_dir / "summary.json").read_text())
    cmd = [sys.executable, "-m", "effitrain.cli", *overrides, f"run_dir={run_dir}", "overwrite=true"]
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    summary = json.loads((run_dir / "summary.json").read_text())
    record.write_text(json.dumps(overrides))
    summary["wall_seconds"] = time.time() - t0
    return summary


def row(name: str, s: dict, target: str) -> dict:
    losses = s.get("eval_losses") or {}
    others = [v for k, v in losses.items() if k != target]
    sel = s.get("selection") or {}
    kept_domains = sel.get("kept_domains") or {}
    kept = sel.get("kept_examples")
    return {
        "method": name,
        "kept_examples": kept,
        "kept_token_fraction": sel.get("kept_token_fraction", 1.0),
        "target_share": (kept_domains.get(target, 0) / kept) if kept else None,
        "target_loss": losses.get(target),
        "general_loss": sum(others) / len(others) if others else None,
        "all_loss": s.get("final_eval_loss"),
        # a reused manifest reports the scoring run's time (older manifests kept it under scoring_seconds)
        "selection_seconds": sel.get("scoring_seconds") if sel.get("cache_hit") and "reuse_seconds" not in sel
        else sel.get("seconds"),
        "examples_per_s": sel.get("examples_per_s"),
        "cache_hit": sel.get("cache_hit"),
        "losses": losses,
    }


def fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def table(rows: list[dict], target: str) -> str:
    head = (f"| selection | kept docs | kept tokens | {target} share of kept | {target} eval loss | "
            f"other domains eval loss | all domains | selection s | examples/s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['kept_examples'], 'd') if r['kept_examples'] else '–'} | "
                     f"{fmt(100 * r['kept_token_fraction'], '.1f')}% | "
                     f"{fmt(100 * r['target_share'], '.1f') + '%' if r['target_share'] is not None else '–'} | "
                     f"{fmt(r['target_loss'])} | {fmt(r['general_loss'])} | {fmt(r['all_loss'])} | "
                     f"{fmt(r['selection_seconds'], '.1f')} | {fmt(r['examples_per_s'], '.0f')} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """The marked section (under the "Data selection" heading when the file has none yet)."""
    from _sections import replace_marked_section

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START not in text:  # the heading the section lives under, for a file that has neither
        path.write_text(text.rstrip() + "\n\n## Data selection\n")
    replace_marked_section(path, SECTION_START, SECTION_END, f"{SECTION_START}\n{body.rstrip()}\n{SECTION_END}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--target", default="prose", help="demo-corpus domain the selection should match")
    ap.add_argument("--target-examples", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.25, help="budget: share of the pool's tokens")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_selection")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose 'Data selection' section to replace")
    ap.add_argument("--reuse", action="store_true",
                    help="keep finished runs whose overrides are unchanged (continue an interrupted benchmark)")
    ap.add_argument("--reference-full", action="store_true",
                    help="perplexity / diversity_kmeans score with the full-pool run's final model, not the proxy")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", "train.save_every=0", f"train.seed={args.seed}",
              "logger.progress_bar=false", *args.overrides]
    rows = []
    print(f"full pool: {args.steps} steps", flush=True)
    full_dir = args.out / "full"
    full = run(["selection=none", *common], full_dir, args.out / "full.log", args.reuse)
    rows.append(row("full pool (none)", full, args.target))
    ref = full_dir / "final_model"
    target = (f"selection.target={{domain:{args.target},split:train,max_examples:{args.target_examples}}}")
    for m in args.methods:
        over = [f"selection={m}", target, f"selection.budget.fraction={args.fraction}", "selection.budget.unit=tokens",
                f"model.tokenizer={ref}", *common]
        if m in NEEDS_REFERENCE and args.reference_full:
            over.append(f"selection.scorer.model_path={ref}")
        print(f"{m}: selecting and training", flush=True)
        s = run(over, args.out / m, args.out / f"{m}.log", args.reuse)
        r = row(m, s, args.target)
        rows.append(r)
        print(f"  {args.target} loss {fmt(r['target_loss'])}, others {fmt(r['general_loss'])}, "
              f"selection {fmt(r['selection_seconds'], '.1f')} s", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    tab = table(rows, args.target)
    print(tab)
    if args.write:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        cmd = env + "python scripts/bench_selection.py " + " ".join(
            [f"--steps {args.steps}", f"--target {args.target}", f"--fraction {args.fraction}",
             f"--target-examples {args.target_examples}", *(["--reference-full"] if args.reference_full else []),
             *(["--methods " + " ".join(args.methods)]
                                                            if list(args.methods) != list(METHODS) else []),
             *args.overrides, f"--write {args.write}"])
        body = (f"Pool: the demo corpus (train split, every domain). Target: {args.target_examples} `{args.target}` "
                f"documents held out of the pool. Budget: {args.fraction:.0%} of the pool's tokens. Every row trains "
                f"the default `tiny_llama` for {args.steps} steps with the full-pool run's tokenizer; eval losses are "
                f"mean token losses on the untouched eval split. Machine: {platform.machine()}, "
                f"{os.cpu_count()} CPU cores, {platform.python_version()}.\n\n"
                f"```\n{cmd}\n```\n\n{tab}\n")
        body = with_reading(body, __file__)
        write_section(args.write, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
