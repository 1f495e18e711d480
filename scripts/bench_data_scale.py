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

With ``--selection dsir dedup`` (``--write`` then fills a second section) the selections instead, alone (no
tokenizer, no packing), each against its peer on the same files:

* ``effitrain dsir, N tasks``: the corpus scan and ``selection=dsir`` (the recipe's settings, target: 64
  ``science`` documents) as sharded jobs (:func:`effitrain.data.sharded.scan_and_select`) -- counts, importance
  weights and the global Gumbel top-k of 25% of the pool's tokens;
* ``data-selection (official DSIR), N procs``: the authors' package (``pip install data-selection``), its
  ``HashedNgramDSIR`` with the same features (10,000 buckets, unigrams + bigrams, ``min_example_length`` 100) on the
  same 16 files, ``num_proc=N``, a target file of the first 64 ``science`` documents: fit, weights and
  ``resample`` of a quarter of the documents (which writes them out);
* ``effitrain dedup, N tasks``: the scan and ``selection=dedup`` (exact + MinHash LSH, 128 permutations, word
  5-shingles, threshold 0.8) as sharded jobs;
* ``datatrove MinHash, N tasks``: datatrove's four stages (signatures, buckets, cluster, filter) with its default
  ``MinhashConfig`` (14 bands of 8 hashes, 5-grams) under LocalPipelineExecutor, the filter without a writer (the
  sharded dedup writes no documents either: tokenize reads the kept ones).

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
sys.path.insert(0, str(REPO / "scripts"))
from _sections import load_average, replace_marked_section  # noqa: E402
VOCAB = 8192
SEQ_LEN = 512
FILES = 16
START = "<!-- bench_data_scale:start -->"
END = "<!-- bench_data_scale:end -->"
SELECT_START = "<!-- bench_data_scale_selection:start -->"
SELECT_END = "<!-- bench_data_scale_selection:end -->"
TARGET_DOMAIN, TARGET_DOCS = "science", 64
SELECTION_KINDS = {"dsir": ("effitrain-dsir", "official-dsir"), "dedup": ("effitrain-dedup", "datatrove-minhash")}
KIND_NAMES = {"effitrain-dsir": "effitrain dsir (sharded)", "official-dsir": "data-selection (official DSIR)",
              "effitrain-dedup": "effitrain dedup (sharded)", "datatrove-minhash": "datatrove MinHash, 4 stages"}


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
    elif kind in ("effitrain-dsir", "effitrain-dedup"):
        out.update(_effitrain_selection(kind.split("-")[1], dataset, corpus, tasks))
    elif kind == "official-dsir":
        out.update(_official_dsir(corpus, tasks, cache))
    elif kind == "datatrove-minhash":
        out.update(_datatrove_minhash(corpus, tasks, cache))
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


def _selection_params(method: str) -> object:
    """``selection=METHOD`` as the recipe composes it (the shipped block), the dsir target set."""
    import yaml

    from effitrain.registry import REGISTRY

    body = yaml.safe_load((REPO / "effitrain" / "configs" / "selection" / f"{method}.yaml").read_text())
    if method == "dsir":
        body["target"] = {**body["target"], "domain": TARGET_DOMAIN, "max_examples": TARGET_DOCS}
    return REGISTRY.parse("selection", body, "selection").params


def _effitrain_selection(method: str, dataset: object, corpus: Path, tasks: int) -> dict:
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import scan_and_select
    from effitrain.selection.sharded import sharded_selection

    hook = sharded_selection(method, _selection_params(method), seed=0)
    scan_and_select(dataset, EngineSettings("local", tasks=tasks, workers=tasks), selection=hook)
    return {"kept": hook.info.get("kept_examples")}


def _target_file(corpus: Path, path: Path) -> Path:
    """The first ``TARGET_DOCS`` documents of the target domain, in file order (the official package's target)."""
    chosen = []
    for part in sorted(corpus.glob("*.jsonl")):
        with open(part, encoding="utf-8") as fh:
            for line in fh:
                if len(chosen) < TARGET_DOCS and json.loads(line)["domain"] == TARGET_DOMAIN:
                    chosen.append(line)
    path.write_text("".join(chosen))
    return path


def _peers_needed(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"--selection runs the peers: pip install 'effitrain[data-bench]' ({module} is missing)")


def _official_dsir(corpus: Path, tasks: int, cache: Path) -> dict:
    _peers_needed("data_selection")
    from data_selection import HashedNgramDSIR

    files = [str(f) for f in sorted(corpus.glob("*.jsonl"))]
    docs = sum(1 for f in files for _ in open(f, encoding="utf-8"))
    dsir = HashedNgramDSIR(files, [str(_target_file(corpus, cache / "target.jsonl"))], cache_dir=str(cache / "dsir"),
                           num_proc=tasks, ngrams=2, num_buckets=10_000, min_example_length=100)
    dsir.fit_importance_estimator(num_tokens_to_fit="auto")
    dsir.compute_importance_weights()
    dsir.resample(out_dir=str(cache / "selected"), num_to_sample=docs // 4, cache_dir=str(cache / "resample"))
    kept = sum(1 for f in (cache / "selected").glob("*.jsonl") for _ in open(f, encoding="utf-8"))
    return {"kept": kept}


def _xxhash_takes_text() -> None:
    """datatrove 0.10 hands ``str`` shingles to xxhash, which xxhash 4 refuses ("Strings must be encoded before
    hashing"; xxhash 3 encoded them as UTF-8 itself): give its default hash function that encoding back, at the cost
    xxhash 3 paid, rather than fall back to its slower sha1 option."""
    import xxhash
    from datatrove.utils.hashes import xxhash as datatrove_xxhash

    try:
        xxhash.xxh64_intdigest("text")
    except TypeError:
        datatrove_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(
            data.encode("utf-8") if isinstance(data, str) else data)
        datatrove_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(
            data.encode("utf-8") if isinstance(data, str) else data)


def _datatrove_minhash(corpus: Path, tasks: int, cache: Path) -> dict:
    """datatrove's MinHash deduplication as its example runs it (examples/minhash_deduplication.py), locally."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader

    _peers_needed("spacy")  # datatrove's English word tokenizer
    _xxhash_takes_text()
    config, work = MinhashConfig(), cache / "minhash"

    def reader():
        return JsonlReader(str(corpus), glob_pattern="*.jsonl", text_key="text")

    def run(pipeline, n, stage):  # fork, as effitrain's own tasks: the workers keep the hash shim
        LocalPipelineExecutor(pipeline, tasks=n, workers=min(n, tasks), logging_dir=str(work / "logs" / stage),
                              start_method="fork").run()

    run([reader(), MinhashDedupSignature(output_folder=str(work / "signatures"), config=config)], tasks, "signatures")
    run([MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"),
                             config=config)], config.num_buckets, "buckets")
    run([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove_ids"),
                             config=config)], 1, "cluster")
    run([reader(), MinhashDedupFilter(input_folder=str(work / "remove_ids"))], tasks, "filter")
    stats = json.loads((work / "logs" / "filter" / "stats.json").read_text())
    kept = stats[-1]["stats"].get("forwarded")  # the filter, the last step: the documents it passed on
    return {"kept": int(kept["total"] if isinstance(kept, dict) else kept) if kept is not None else None}


def _watch_children(proc: subprocess.Popen, every: float = 0.2):
    """Sample the peak RSS (MB) of any one descendant of ``proc`` every ``every`` s, in a thread; returns a function
    that joins it and gives the peak."""
    import threading

    import psutil

    peak = [0.0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for child in root.children(recursive=True):
                    peak[0] = max(peak[0], child.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(every)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()

    def result() -> float:
        watcher.join()
        return peak[0]

    return result


def _run_one(kind: str, corpus: Path, tasks: int, tokenizer_file: Path) -> dict:
    """``kind`` in a fresh interpreter with an empty cache; its console lines give the sharded stage times."""
    cache = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    try:
        proc = subprocess.Popen([sys.executable, __file__, "_one", kind, str(corpus), str(tasks), str(cache),
                                 str(tokenizer_file)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        peak_child = _watch_children(proc)
        stdout, stderr = proc.communicate()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} x{tasks} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    # getrusage sees only the children a process waited for; pools that outlive the measurement (joblib's workers
    # in the official DSIR package) are seen by the sampling alone
    result["rss_task_mb"] = max(result["rss_task_mb"], peak_child())
    result["stages"] = {m[0]: float(m[1]) for m in re.findall(r"data: ([\w-]+): done in ([\d.]+) s", stdout)}
    return result


# -------------------------------------------------------------------------------------------------- the table
def _row(name: str, docs: int, tasks: int, r: dict) -> str:
    per_core = docs / r["wall_s"] / min(tasks, os.cpu_count() or 1)
    stages = r.get("stages") or {}
    other = r["wall_s"] - sum(stages.values())
    split = (f"scan {stages.get('scan', 0):.1f} / tokenize {stages.get('tokenize', 0):.1f} / pack "
             f"{stages.get('pack', 0):.1f} / other {other:.1f}") if stages else ""
    return (f"| {docs:,} | {name} | {tasks} | {r['wall_s']:.1f} s | {per_core:,.0f} | {r['rss_self_mb']:,.0f} MB | "
            f"{r['rss_task_mb']:,.0f} MB | {split} |")


def _selection_row(kind: str, docs: int, tasks: int, r: dict, peer: dict | None) -> str:
    per_core = docs / r["wall_s"] / min(tasks, os.cpu_count() or 1)
    stages = " / ".join(f"{k} {v:.1f}" for k, v in (r.get("stages") or {}).items())
    ratio = f"{peer['wall_s'] / r['wall_s']:.2f}x" if peer else ""
    kept = f"{r['kept']:,}" if isinstance(r.get("kept"), int) else "?"
    task = f"{r['rss_task_mb']:,.0f} MB" if r["rss_task_mb"] >= 1 else "none (in the driver)"
    return (f"| {docs:,} | {KIND_NAMES[kind]} | {tasks} | {r['wall_s']:.1f} s | {per_core:,.0f} | {ratio} | "
            f"{r['rss_self_mb']:,.0f} MB | {task} | {kept} | {stages} |")


def _selection_section(args: argparse.Namespace, argv: list[str], workdir: Path) -> str:
    """Each selection against its peer, alternating (ours, the peer) at every size and task count."""
    import make_corpus

    lines, loads = [], []
    for docs in args.docs:
        corpus = workdir / f"corpus-{docs}"
        if not corpus.exists():
            make_corpus.generate(corpus, docs=docs, files=FILES, fmt="jsonl", seed=0, ids=True)
        loads.append(f"{docs:,} docs: load {load_average()}")
        for tasks in args.tasks:
            for method in args.selection:
                ours, peer = SELECTION_KINDS[method]
                mine = _run_one(ours, corpus, tasks, workdir / "unused-tokenizer.json")
                theirs = _run_one(peer, corpus, tasks, workdir / "unused-tokenizer.json")
                lines.append(_selection_row(ours, docs, tasks, mine, theirs))
                lines.append(_selection_row(peer, docs, tasks, theirs, None))
                print(*lines[-2:], sep="\n", flush=True)
    command = "python scripts/bench_data_scale.py " + " ".join(argv)
    return "\n".join([
        SELECT_START, "### Selections at scale, against their peers", "",
        f"`{command}` on {os.cpu_count()} CPU cores; load before each size: {'; '.join(loads)}.  The same "
        f"corpora ({FILES} JSON-lines files, 5 domains); each cell a fresh process with an empty cache, ours then "
        f"the peer's at each size and task count.  `vs peer`: the peer's wall time over ours (above 1: ours is "
        f"faster).  `kept`: the documents selected.  Our stage times come from the `data: STAGE: done in` lines "
        f"(the reduces between them are not listed).", "",
        "| documents | selection | tasks | wall | docs/s per core | vs peer | peak RSS (driver) | peak RSS (task) | "
        "kept | stages (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines, SELECT_END, ""])


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
    parser.add_argument("--selection", nargs="+", choices=sorted(SELECTION_KINDS),
                        help="benchmark these selections against their peers instead of tokenize + pack")
    parser.add_argument("--write", type=Path, help="replace the data-scale section of this markdown file")
    args = parser.parse_args(argv)

    import make_corpus

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    if args.selection:
        try:
            section = _selection_section(args, argv, workdir)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        print(section)
        if args.write:
            replace_marked_section(args.write, SELECT_START, SELECT_END, section)
        return 0
    lines = []
    loads = []
    try:
        for docs in args.docs:
            corpus = workdir / f"corpus-{docs}"
            if not corpus.exists():
                make_corpus.generate(corpus, docs=docs, files=FILES, fmt="jsonl", seed=0, ids=True)
            size = sum(p.stat().st_size for p in corpus.iterdir()) / 2**20
            loads.append(f"{docs:,} docs ({size:,.0f} MiB): load {load_average()}")
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
        replace_marked_section(args.write, START, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
