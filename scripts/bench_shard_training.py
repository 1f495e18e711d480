#!/usr/bin/env python
"""Training throughput from token shards against the in-memory path on the same data (issue 24's target: within 3%).

    OMP_NUM_THREADS=1 python scripts/bench_shard_training.py --docs 10000 --steps 200 --rounds 5 \
        --write docs/benchmarks.md

A corpus of ``--docs`` documents (scripts/make_corpus.py, 16 files) is trained on by the console script twice over:
``dataset=local`` as it is (the in-memory path: a ``datasets`` table of packed rows) and with ``data.executor=local
data.tasks=2`` (memory-mapped token shards holding the same rows, tests/test_data_engine.py).  One run of each arm
first fills the caches, unmeasured; then ``--rounds`` rounds alternate the arms, each a fresh run directory on the
warm caches, and each run's ``tokens_per_s`` (summary.json: tokens trained over the training loop's seconds, data
building excluded) is read.  Reported: the median of each arm, the spread, and the ratio shards / in-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from _sections import load_average, replace_marked_section, with_reading  # noqa: E402

START = "<!-- bench_shard_training:start -->"
END = "<!-- bench_shard_training:end -->"
ARMS = {"in-memory (datasets table)": [], "token shards (data.executor=local, 2 tasks)":
        ["data.executor=local", "data.tasks=2"]}


def _train(common: list[str], arm: list[str], run_dir: Path, env: dict) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "effitrain.cli", *common, *arm, f"run_dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(arm) or 'in-memory'} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of this markdown file")
    args = parser.parse_args(argv)
    import make_corpus

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-shard-training-"))
    corpus = workdir / f"corpus-{args.docs}"
    if not corpus.exists():
        make_corpus.generate(corpus, docs=args.docs, files=16, fmt="jsonl", seed=0, ids=True)
    env = {**os.environ, "EFFITRAIN_CACHE": str(workdir / "cache"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    common = ["dataset=local", f"dataset.path={corpus}", "dataset.domain_field=domain", f"train.max_steps={args.steps}",
              "train.eval_every=0", "train.eval_batches=1", "train.save_final_model=false", "overwrite=true"]
    rows: dict[str, list[float]] = {name: [] for name in ARMS}
    sequences = {}
    try:
        for name, arm in ARMS.items():  # warm-up: the caches (pool, tokenizer, rows, shards) filled once
            sequences[name] = _train(common, arm, workdir / "warm", env)["train_sequences"]
        load_before = load_average()
        for r in range(args.rounds):
            for name, arm in (ARMS.items() if r % 2 == 0 else reversed(ARMS.items())):
                summary = _train(common, arm, workdir / "run", env)
                rows[name].append(summary["tokens_per_s"])
                print(f"round {r}: {name}: {summary['tokens_per_s']:,.0f} tokens/s", flush=True)
        load_after = load_average()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    (memory_name, memory), (shards_name, shards) = rows.items()
    ratio = statistics.median(shards) / statistics.median(memory)
    per_round = [s / m for s, m in zip(shards, memory)]
    command = "OMP_NUM_THREADS=1 python scripts/bench_shard_training.py " + " ".join(argv)
    lines = [f"| {name} | {sequences[name]:,} | {statistics.median(v):,.0f} | {min(v):,.0f} - {max(v):,.0f} |"
             for name, v in rows.items()]
    body = "\n".join([
        START, "### Training from token shards against the in-memory path", "",
        f"`{command}` on {os.cpu_count()} CPU cores (load {load_before} before the measured rounds, {load_after} "
        f"after): the default tiny Llama for {args.steps} steps on {args.docs:,} documents, {args.rounds} rounds "
        f"alternating the arms on warm caches; tokens/s from each run's summary.json (the training loop only).", "",
        "| arm | train rows | tokens/s (median) | range |", "|---|---|---|---|", *lines, "",
        f"Shards / in-memory: **{ratio:.3f}** (median of each arm); per round: "
        f"{', '.join(f'{x:.3f}' for x in per_round)}.", ""])
    section = with_reading(body, __file__) + END + "\n"
    print(section)
    if args.write:
        replace_marked_section(args.write, START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
