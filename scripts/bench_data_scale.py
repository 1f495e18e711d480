#!/usr/bin/env python
"""Tokenize + pack at scale: the in-memory path, the sharded data engine with 1 and 2 local tasks, and datatrove's
own DocumentTokenizer on the same files, each in a fresh process with a cold cache.

    python scripts/bench_data_scale.py --docs 10000 100000 --tasks 1 2 --write docs/benchmarks.md

For every corpus size a corpus is written by scripts/make_corpus.py (16 JSON-lines files, 5 domains, ids), then:

* ``in-memory``: today's path for ``dataset=local`` without ``data.executor`` (``build_local`` ->
  ``build_packed_splits``), skipped above ``--in-memory-max`` documents (it holds the pool in memory);
* ``sharded, N tasks``: :func:`effitrain.data.sharded.build_sharded_splits` with ``data.executor=local
  data.tasks=N data.workers=N`` -- scan (hold-out, BPE sample), BPE training, tokenize, pack into token shards;
  the stage times come from its ``data: STAGE: done in S s`` lines;
* ``datatrove, N tasks``: ``JsonlReader -> DocumentTokenizer`` (no shuffling) with the tokenizer the sharded run
  trained, under datatrove's LocalPipelineExecutor: tokenization only (no hold-out, no rows, no BPE training).

Reported: wall time, documents per second per core (``docs / wall / min(tasks, cores)``), the peak RSS of the
driving process and of the largest task process (``getrusage``: RUSAGE_SELF and RUSAGE_CHILDREN), and ``uptime``'s
load before each size.  The machine is shared: run it when the load is low.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 8192
SEQ_LEN = 512
FILES = 16
START = "<!-- bench_data_scale:start -->"
END = "<!-- bench_data_scale:end -->"


# ----------------------------------------------------------------------------------------- one measured process
def _measure(kind: str, corpus: Path, tasks: int, cache: Path, tokenizer_file: str) -> dict:
    os.environ["EFFITRAIN_CACHE"] = str(cache)
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams

    load_builtin_blocks()
    dataset = LocalParams(path=[str(corpus)], domain_field="domain", eval_examples_per_domain=50, seq_len=SEQ_LEN)
    model = LlamaParams(vocab_size=VOCAB)
    start = time.perf_counter()
    out: dict = {}
    if kind == "in-memory":
        from datasets import DatasetDict

        from effitrain.data.build import build_local
        from effitrain.data.splits import build_packed_splits

        pool = build_local(dataset)
        _, train, _ = build_packed_splits(dataset, model, DatasetDict(train=pool["train"], eval=pool["eval"]),
                                          tokenizer_corpus=pool["train"])
        out["rows"] = len(train)
    elif kind == "sharded":
        from effitrain.data.engine import EngineSettings
        from effitrain.data.sharded import build_sharded_splits

        tokenizer, shards, _ = build_sharded_splits(dataset, model, EngineSettings("local", tasks=tasks,
                                                                                   workers=tasks))
        out["rows"] = len(shards)
        tokenizer.backend_tokenizer.save(tokenizer_file)
    else:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer

        work = cache / "datatrove"
        LocalPipelineExecutor([JsonlReader(str(corpus), glob_pattern="*.jsonl", text_key="text"),
                               DocumentTokenizer(str(work / "tokens"), tokenizer_name_or_path=tokenizer_file,
                                                 eos_token="<|endoftext|>", shuffle_documents=False)],
                              tasks=tasks, workers=tasks, logging_dir=str(work / "logs")).run()
        out["tokens_bytes"] = sum(p.stat().st_size for p in (work / "tokens").glob("*.ds"))
    out["wall_s"] = time.perf_counter() - start
    out["rss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_task_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def _run_one(kind: str, corpus: Path, tasks: int, tokenizer_file: Path) -> dict:
    """``kind`` in a fresh interpreter with an empty cache; its console lines give the sharded stage times."""
    cache = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    try:
        proc = subprocess.run([sys.executable, __file__, "_one", kind, str(corpus), str(tasks), str(cache),
                               str(tokenizer_file)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} x{tasks} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stages"] = {m[0]: float(m[1]) for m in re.findall(r"data: (\w+): done in ([\d.]+) s", proc.stdout)}
    return result


# -------------------------------------------------------------------------------------------------- the table
def _load() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def _row(name: str, docs: int, tasks: int, r: dict) -> str:
    per_core = docs / r["wall_s"] / min(tasks, os.cpu_count() or 1)
    stages = r.get("stages") or {}
    other = r["wall_s"] - sum(stages.values())
    split = (f"scan {stages.get('scan', 0):.1f} / tokenize {stages.get('tokenize', 0):.1f} / pack "
             f"{stages.get('pack', 0):.1f} / other {other:.1f}") if stages else ""
    return (f"| {docs:,} | {name} | {tasks} | {r['wall_s']:.1f} s | {per_core:,.0f} | {r['rss_self_mb']:,.0f} MB | "
            f"{r['rss_task_mb']:,.0f} MB | {split} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_one"]:
        kind, corpus, tasks, cache, tokenizer_file = argv[1:]
        print(json.dumps(_measure(kind, Path(corpus), int(tasks), Path(cache), tokenizer_file)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--in-memory-max", type=int, default=10_000,
                        help="skip the in-memory path above this many documents")
    parser.add_argument("--workdir", type=Path, default=None, help="where the corpora are written (default: a "
                                                                   "temporary folder, removed at the end)")
    parser.add_argument("--write", type=Path, help="replace the data-scale section of this markdown file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "scripts"))
    import make_corpus

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    lines = []
    loads = []
    try:
        for docs in args.docs:
            corpus = workdir / f"corpus-{docs}"
            if not corpus.exists():
                make_corpus.generate(corpus, docs=docs, files=FILES, fmt="jsonl", seed=0, ids=True)
            size = sum(p.stat().st_size for p in corpus.iterdir()) / 2**20
            loads.append(f"{docs:,} docs ({size:,.0f} MiB): load {_load()}")
            tokenizer_file = workdir / f"tokenizer-{docs}.json"
            if docs <= args.in_memory_max:
                lines.append(_row("in-memory (today)", docs, 1, _run_one("in-memory", corpus, 1, tokenizer_file)))
                print(lines[-1], flush=True)
            for tasks in args.tasks:  # alternating: ours, then datatrove's, at each task count
                lines.append(_row("sharded engine", docs, tasks, _run_one("sharded", corpus, tasks, tokenizer_file)))
                print(lines[-1], flush=True)
                lines.append(_row("datatrove DocumentTokenizer", docs, tasks,
                                  _run_one("datatrove", corpus, tasks, tokenizer_file)))
                print(lines[-1], flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    command = "python scripts/bench_data_scale.py " + " ".join(argv)
    section = "\n".join([
        START, "## Data at scale: tokenize and pack", "",
        f"`{command}` on {os.cpu_count()} CPU cores (shared); load before each size: {'; '.join(loads)}.  "
        f"Corpora from `scripts/make_corpus.py` ({FILES} JSON-lines files, 5 domains); a BPE of {VOCAB} entries, "
        f"rows of {SEQ_LEN} tokens; each cell a fresh process with an empty cache.  Peak RSS: the driving process and "
        f"the largest task process.  The sharded engine does more than datatrove's tokenizer (the hold-out scan, "
        f"BPE training on its sample, packing rows into shards): its stage times are split out; `other` is start-up, "
        f"the input check and the BPE training.", "",
        "| documents | path | tasks | wall | docs/s per core | peak RSS (driver) | peak RSS (task) | "
        "stages (s) |",
        "|---|---|---|---|---|---|---|---|",
        *lines, END, ""])
    print(section)
    if args.write:
        from _sections import replace_marked_section

        replace_marked_section(args.write, START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
