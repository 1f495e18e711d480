"""The synthesis stage: a pipeline stage whose product is a dataset, made by a generator.

It maps the first ``max_documents`` documents of the train split of the stage's ``dataset`` block through the
stage's rollout (pieces -> prompts -> the generator -> parse -> post-filter) and writes::

    stages/02-rephrase/
      inputs.json               the key of everything the output depends on (documents, rollout, generator)
      chunks/000000.jsonl       the rows of documents 0..chunk_documents-1, written whole (tmp + rename)
      chunks/000000.stats.json  its counts (requests sent / cached, tokens generated), written before the rows
      dataset.jsonl             every chunk's rows in order (written once all chunks are; tmp + rename)
      dataset.json              its sha256, documents, rows, tokens: what a later stage that trains on it records
      summary.json              finished: the pipeline does not run the stage again

A row is ``{"id", "text", "domain", "source_id", "variant", "sample"}``; its domain is the source document's with
``_<domain_suffix>`` appended.  Later stages name the file with ``"@stage:NAME"`` (``dataset: "@stage:NAME"`` to
train on it alone, ``dataset.synthetic: ["@stage:NAME"]`` beside real data).

Resuming: finished chunks are kept; the chunk that was being made asks the request cache
(:mod:`effitrain.generation.cache`) first, so a SIGKILL and a resume send no request twice and give the file an
uninterrupted run gives (each request's seed comes from its key; a transformers batch's from its members, and the
batches of a chunk are formed the same way every time).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from effitrain.errors import RunFailed
from effitrain.registry import ConfigError

from effitrain.data.synthetic import DATASET_FILE, DATASET_RECORD

INPUTS_RECORD = "inputs.json"
CHUNKS_DIR = "chunks"


def product_path(stage_dir: Path) -> Path:
    """The file a synthesis stage leaves, which '@stage:NAME' names."""
    return stage_dir / DATASET_FILE


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _row_bytes(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def run_synthesis(stage: Any, run_cfg: dict[str, Any], stage_dir: Path, *, final_models: dict[str, str],
                  say: Callable[[str], None], label: str, is_main: bool = True) -> dict[str, Any]:
    """Make (or finish making) the stage's dataset; returns the stage's summary (also written as summary.json)."""
    from effitrain.config.blocks.synthesis import parse_synthesis
    from effitrain.config.spec import validate
    from effitrain.config.stages import resolve_refs
    from effitrain.train import _write_summary

    if not is_main:  # rank 0 makes the data; the others wait for its summary (as for a transformed model)
        return _wait_for(stage_dir)
    params = parse_synthesis(resolve_refs(stage.synthesis, final_models), f"stages.{stage.name}.synthesis")
    spec = validate(run_cfg)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / CHUNKS_DIR).mkdir(exist_ok=True)

    documents = _input_documents(spec, params)
    rollout = params.rollout_block.build()
    gen_block = params.generator_block
    from effitrain.config.blocks.generator import model_folder

    model_path = model_folder(gen_block.params.model) if gen_block.name != "openai" else None
    if model_path is not None:
        gen_block.params.check_model(f"stages.{stage.name}.synthesis.generator")  # written by an earlier stage
    generator = gen_block.build(model_path=model_path)
    inputs_key = _inputs_key(documents, params, generator)
    _check_inputs_record(stage_dir, inputs_key, stage.name)

    from effitrain.paths import cache_dir

    from effitrain.generation.cache import NoCache, RequestCache

    cache = RequestCache(cache_dir("generation")) if params.cache_requests else NoCache()
    size = params.chunk_documents
    n_chunks = (len(documents) + size - 1) // size
    totals = {"sent": 0, "cached": 0, "tokens": 0, "rows": 0, "pieces": 0, "dropped": 0}
    started, done_docs, tokens_here = time.monotonic(), 0, 0
    say(f"{label}: synthesis of {len(documents)} documents with rollout {params.rollout_block.name} and generator "
        f"{gen_block.name} ({gen_block.params.model}), {n_chunks} chunk(s) in {stage_dir / CHUNKS_DIR}")
    try:
        for c in range(n_chunks):
            chunk_docs = documents[c * size:(c + 1) * size]
            rows_path = stage_dir / CHUNKS_DIR / f"{c:06d}.jsonl"
            stats_path = stage_dir / CHUNKS_DIR / f"{c:06d}.stats.json"
            if rows_path.is_file() and stats_path.is_file():
                stats = json.loads(stats_path.read_text())
            else:
                stats, rows = _make_chunk(chunk_docs, rollout, generator, cache, params)
                _atomic_write(stats_path, json.dumps(stats, sort_keys=True).encode())
                _atomic_write(rows_path, b"".join(_row_bytes(r) for r in rows))
                tokens_here += stats["tokens_sent"]
            for key in totals:
                totals[key] += stats[key]
            done_docs += len(chunk_docs)
            elapsed = max(time.monotonic() - started, 1e-6)
            rate = tokens_here / elapsed
            eta = elapsed / done_docs * (len(documents) - done_docs) if done_docs else 0.0
            say(f"{label}: {done_docs}/{len(documents)} documents, {totals['rows']} rows, {totals['tokens']:,} "
                f"tokens generated ({rate:,.0f} tokens/s), requests {totals['sent']} sent / {totals['cached']} "
                f"cached, ETA {eta:,.0f} s")
    finally:
        cache.close()
        generator.close()
    if not totals["rows"]:
        raise RunFailed(f"stages.{stage.name}: the rollout's post-filter kept none of the {totals['pieces']} pieces' "
                        f"answers; nothing to train on (look at the generator's answers, or loosen the filter)")
    record = _assemble(stage_dir, n_chunks, len(documents), totals, inputs_key, gen_block, params)
    summary = {"finished": True, "stopped_by": None, "exit_code": 0, "steps": 0, "tokens": 0, "train_seconds": 0.0,
               "flops": 0.0, "flops_sparse": 0.0, "final_model": None, "final_eval_loss": None,
               "synthesis": record, "dataset": str(product_path(stage_dir))}
    _write_summary(stage_dir, summary)
    say(f"{label}: wrote {record['rows']} rows ({record['documents']} documents in, {record['tokens_generated']:,} "
        f"tokens generated) to {product_path(stage_dir)} (sha256 {record['sha256'][:12]})")
    return summary


def _input_documents(spec: Any, params: Any) -> list[dict[str, str]]:
    """The first ``max_documents`` documents of the train split of the stage's dataset block, as plain rows."""
    from effitrain.paths import cache_dir

    pool = spec.block("dataset").build(cache_dir=cache_dir("datasets"))
    train = pool["train"]
    count = len(train) if params.max_documents is None else min(params.max_documents, len(train))
    if count == 0:
        raise ConfigError("dataset: the synthesis stage's input has no train documents")
    part = train.select(range(count))
    return [{"id": str(i), "text": str(t), "domain": str(d)} for i, t, d in zip(part["id"], part["text"],
                                                                                 part["domain"])]


def _inputs_key(documents: list[dict[str, str]], params: Any, generator: Any) -> str:
    import dataclasses

    h = hashlib.sha256()
    for doc in documents:
        h.update(json.dumps(doc, sort_keys=True).encode())
    rollout = {"name": params.rollout_block.name, **dataclasses.asdict(params.rollout_block.params)}
    h.update(json.dumps([rollout, generator.cache_scope(), params.chunk_documents, params.domain_suffix],
                        sort_keys=True).encode())
    return h.hexdigest()


def _check_inputs_record(stage_dir: Path, key: str, name: str) -> None:
    """A resumed stage continues only the dataset it started: chunks made from other inputs are never mixed in."""
    path = stage_dir / INPUTS_RECORD
    if path.is_file():
        recorded = json.loads(path.read_text()).get("key")
        if recorded != key:
            raise ConfigError(f"stages.{name}: {stage_dir} holds chunks made from other inputs (documents, rollout "
                              f"or generator changed since); use a new run_dir, or overwrite=true")
        return
    _atomic_write(path, json.dumps({"key": key}).encode())


def _make_chunk(docs: list[dict[str, str]], rollout: Any, generator: Any, cache: Any,
                params: Any) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The rows of one chunk of documents, asking the cache first and the generator for the rest."""
    units = []  # (doc, piece index, variant, request)
    for doc in docs:
        for p, piece in enumerate(rollout.pieces(doc["text"])):
            for variant, prompt in rollout.prompts(piece):
                units.append((doc, p, piece, variant, generator.request(prompt)))
    answers: dict[str, Any] = {}
    unique = list({u[4].key: u[4] for u in units}.values())  # a prompt asked twice is one request
    missing = []
    for request in unique:
        cached = cache.get(request.key)
        if cached is None:
            missing.append(request)
        else:
            answers[request.key] = cached
    tokens_sent = 0
    if missing:
        for group in generator.answer(missing):
            cache.put_many([(r.key, a) for r, a in group])
            for r, a in group:
                answers[r.key] = a
                tokens_sent += a.tokens
    rows, dropped = [], 0
    for doc, p, piece, variant, request in units:
        for j, completion in enumerate(answers[request.key].texts):
            text = rollout.parse(completion)
            if text is None or not rollout.keep(piece, text):
                dropped += 1
                continue
            rows.append({"id": f"{doc['id']}/{p}/{variant}/{j}", "text": text,
                         "domain": f"{doc['domain']}_{params.domain_suffix}", "source_id": doc["id"],
                         "variant": variant, "sample": j})
    stats = {"sent": len(missing), "cached": len(unique) - len(missing), "rows": len(rows), "dropped": dropped,
             "pieces": len({(u[0]["id"], u[1]) for u in units}), "tokens_sent": tokens_sent,
             "tokens": sum(answers[r.key].tokens for r in unique)}
    return stats, rows


def _assemble(stage_dir: Path, n_chunks: int, n_docs: int, totals: dict[str, int], inputs_key: str,
              gen_block: Any, params: Any) -> dict[str, Any]:
    out = product_path(stage_dir)
    tmp = out.with_name(out.name + ".tmp")
    h = hashlib.sha256()
    domains: dict[str, int] = {}
    with open(tmp, "wb") as f:
        for c in range(n_chunks):
            data = (stage_dir / CHUNKS_DIR / f"{c:06d}.jsonl").read_bytes()
            f.write(data)
            h.update(data)
            for line in data.splitlines():
                domain = json.loads(line)["domain"]
                domains[domain] = domains.get(domain, 0) + 1
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    record = {"sha256": h.hexdigest(), "rows": totals["rows"], "documents": n_docs, "pieces": totals["pieces"],
              "dropped": totals["dropped"], "domains": domains, "tokens_generated": totals["tokens"],
              "requests_sent": totals["sent"], "requests_cached": totals["cached"], "inputs_key": inputs_key,
              "rollout": params.rollout_block.name, "generator": gen_block.name, "model": gen_block.params.model}
    _atomic_write(stage_dir / DATASET_RECORD, json.dumps(record, indent=1, sort_keys=True).encode())
    return record


def _wait_for(stage_dir: Path) -> dict[str, Any]:
    from effitrain.config.resume import finished_summary

    deadline = time.monotonic() + 24 * 3600
    while (summary := finished_summary(stage_dir)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited a day for rank 0 to finish the synthesis stage in {stage_dir}")
        time.sleep(1.0)
    return summary


def planned_counts(spec: Any) -> dict[str, Any]:
    """What a synthesis stage will read and ask for, without a model (``effitrain plan``): its documents, their
    words and pieces, the requests and samples, and the most tokens the answers can hold.  Reads the input through
    the dataset block (the demo corpus from its cache); imports no torch."""
    params = spec.synthesis
    documents = _input_documents(spec, params)
    rollout = params.rollout_block.build()
    prompts = set()
    pieces = words = 0
    for doc in documents:
        for piece in rollout.pieces(doc["text"]):
            pieces += 1
            words += len(piece.split())
            prompts.update(prompt for _, prompt in rollout.prompts(piece))
    sampling = params.generator_block.params
    return {"documents": len(documents), "words": words, "pieces": pieces, "requests": len(prompts),
            "samples": len(prompts) * sampling.n, "max_tokens_out": len(prompts) * sampling.n * sampling.max_new_tokens,
            "domains_out": sorted({f"{d['domain']}_{params.domain_suffix}" for d in documents})}
