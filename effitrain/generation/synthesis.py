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
from typing import Any, Callable, Optional

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
    rollout.bind(documents)
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
    stop = StopRequest()
    try:
        stop.install()
        for c in range(n_chunks):
            chunk_docs = documents[c * size:(c + 1) * size]
            rows_path = stage_dir / CHUNKS_DIR / f"{c:06d}.jsonl"
            stats_path = stage_dir / CHUNKS_DIR / f"{c:06d}.stats.json"
            if rows_path.is_file() and stats_path.is_file():
                stats = json.loads(stats_path.read_text())
            else:
                try:
                    stats, rows = _make_chunk(chunk_docs, rollout, generator, cache, params, stop.requested)
                except Stopped:
                    return _stopped(stage_dir, stop, c, n_chunks, totals, say, label)
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
        stop.restore()
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


class StopRequest:
    """SIGTERM / SIGUSR1 / SIGUSR2 (a cluster's pre-emption and time-limit warnings) and a first Ctrl-C ask the stage
    to stop as training stops (engine.loop.StopSignal): the requests in flight are answered and cached, nothing new
    is sent, the finished chunks stay, and the run exits 75 to be resumed.  A second Ctrl-C quits at once.  Its own
    class, not the loop's: that module imports torch, which a stage asking an endpoint never needs to load."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        from effitrain.console import say_from_signal_handler

        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        say_from_signal_handler(f"{signal.Signals(signum).name}: the synthesis stage stops once the requests in "
                                f"flight are answered (they are cached); resume=auto continues", err=True)

    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _stopped(stage_dir: Path, stop: StopRequest, chunk: int, n_chunks: int, totals: dict[str, int],
             say: Callable[[str], None], label: str) -> dict[str, Any]:
    """The summary of a stage a signal stopped: not finished, exit 75 (resumable), as a training run's."""
    import signal

    from effitrain.errors import EXIT_RESUMABLE

    name = signal.Signals(stop.received).name
    summary = {"finished": False, "stopped_by": f"signal {name} during the synthesis stage (chunk {chunk + 1} of "
                                                f"{n_chunks}; {chunk} written, the answers received cached)",
               "stopped_by_signal": name, "exit_code": EXIT_RESUMABLE, "steps": 0, "tokens": 0,
               "train_seconds": 0.0, "flops": 0.0, "flops_sparse": 0.0, "final_model": None,
               "final_eval_loss": None, "dataset": None, "synthesis": {"chunks_written": chunk, "chunks": n_chunks,
                                                                         **totals}}
    say(f"{label}: stopped by {name}: {chunk} of {n_chunks} chunk(s) written, the answers received are cached; "
        f"continue with resume=auto")
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


#: a rollout's rounds per piece at most: EntiGraph needs 2 (+ its retries); more is a rollout that never ends
MAX_ROUNDS = 32


class Stopped(Exception):
    """A signal asked the stage to stop: the answers received are cached, the chunk being made is not written."""


def _never() -> bool:
    return False


def _make_chunk(docs: list[dict[str, str]], rollout: Any, generator: Any, cache: Any, params: Any,
                should_stop: Callable[[], bool] = _never) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The rows of one chunk of documents, asking the cache first and the generator for the rest, round after
    round: a round's answers decide the next round's requests (``rollout.follow_up``)."""
    from effitrain.generation.rollouts import as_ask

    pending = []  # (doc, piece index, piece, ask) of the round about to be asked
    pieces = 0
    for doc in docs:
        for p, piece in enumerate(rollout.pieces(doc["text"])):
            pieces += 1
            pending += [(doc, p, piece, as_ask(a)) for a in rollout.prompts(piece)]
    answers: dict[str, Any] = {}  # every answer of the chunk by request key (a prompt asked twice is one request)
    rows: list[dict[str, Any]] = []
    counts = {"sent": 0, "cached": 0, "dropped": 0, "tokens_sent": 0}
    for round_no in range(MAX_ROUNDS):
        if not pending:
            break
        units = [(doc, p, piece, ask, generator.request(ask.prompt, ask.attempt)) for doc, p, piece, ask in pending]
        _answer_round([u[4] for u in units], answers, generator, cache, counts, should_stop)
        following: dict[tuple[str, int], list] = {}  # a piece's answered asks of this round, in order
        for doc, p, piece, ask, request in units:
            texts = answers[request.key].texts
            kept = rollout.rows(piece, ask, texts)
            counts["dropped"] += len(texts) - len(kept)
            for j, text in kept:
                rows.append({"id": f"{doc['id']}/{p}/{ask.label}/{j}", "text": text,
                             "domain": f"{doc['domain']}_{params.domain_suffix}", "source_id": doc["id"],
                             "variant": ask.label, "sample": j})
            following.setdefault((doc["id"], p), [doc, piece, []])[2].append((ask, texts))
        pending = [(doc, p, piece, as_ask(a)) for (_, p), (doc, piece, answered) in following.items()
                   for a in rollout.follow_up(piece, answered)]
    else:
        if pending:
            raise RunFailed(f"rollout {getattr(rollout, 'name', '?')}: still asking follow-up requests after "
                            f"{MAX_ROUNDS} rounds; a rollout's follow_up must end")
    stats = {"sent": counts["sent"], "cached": counts["cached"], "rows": len(rows), "dropped": counts["dropped"],
             "pieces": pieces, "tokens_sent": counts["tokens_sent"],
             "tokens": sum(a.tokens for a in answers.values())}
    return stats, rows


def _answer_round(requests: list[Any], answers: dict[str, Any], generator: Any, cache: Any,
                  counts: dict[str, int], should_stop: Callable[[], bool]) -> None:
    """Fill ``answers`` for ``requests``: the cache's first, the generator's for the rest (cached as they come)."""
    missing = []
    for request in {r.key: r for r in requests if r.key not in answers}.values():
        cached = cache.get(request.key)
        if cached is None:
            missing.append(request)
        else:
            answers[request.key] = cached
            counts["cached"] += 1
    if not missing:
        return
    if should_stop():
        raise Stopped
    for group in generator.answer(missing, should_stop=should_stop):
        cache.put_many([(r.key, a) for r, a in group])
        for r, a in group:
            answers[r.key] = a
            counts["sent"] += 1
            counts["tokens_sent"] += a.tokens
    if any(r.key not in answers for r in missing):  # the generator stopped early: a signal asked it to
        raise Stopped


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
    rollout.bind(documents)
    from effitrain.generation.rollouts import as_ask

    prompts = set()
    pieces = words = follow_ups = 0
    for doc in documents:
        for piece in rollout.pieces(doc["text"]):
            pieces += 1
            words += len(piece.split())
            prompts.update(as_ask(a).prompt for a in rollout.prompts(piece))
            # what a later round asks depends on the answers (EntiGraph's entities): only its bound is known
            follow_ups += rollout.planned_follow_ups(piece)
    sampling = params.generator_block.params
    most = len(prompts) + follow_ups
    return {"documents": len(documents), "words": words, "pieces": pieces, "requests": len(prompts),
            "follow_ups": follow_ups, "samples": most * sampling.n,
            "max_tokens_out": most * sampling.n * sampling.max_new_tokens,
            "domains_out": sorted({f"{d['domain']}_{params.domain_suffix}" for d in documents})}
