"""In-context pre-training's chains on the sharded corpus (issue 24, ``curriculum=in_context`` with
``data.executor``): the statistics and embeddings as datatrove tasks, the SVD fit and the FAISS search as reduces,
and the train rows packed in chain order into token shards.

* on a small pool the chain order and every packed row equal the in-memory curriculum's, with the exact index and
  with the authors' IVF-PQ index (the same sample, the same search blocks);
* the chain's mechanism holds on the shards themselves: every kept document is packed once, in the order's
  sequence, and each row's domain is that of the document it starts in;
* a run trains from the chained shards.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO, TINY, train_on_token_shards

sys.path.insert(0, str(REPO / "scripts"))
import make_corpus  # noqa: E402  (scripts/ is not a package)


def _params(path: str):
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams

    load_builtin_blocks()
    return (LocalParams(path=[path], domain_field="domain", eval_examples_per_domain=4, seq_len=64),
            LlamaParams(vocab_size=512))


def _chain_params(**extra):
    from effitrain.config.blocks.curriculum_repacked import InContextParams

    return InContextParams(n_features=2**12, embed_dims=16, **extra)


@pytest.mark.parametrize("index", ["flat", "ivfpq"])
def test_sharded_chains_are_the_in_memory_chains_row_for_row(tmp_path, monkeypatch, index):
    """600 documents in 5 files, 3 tasks, and a fitting sample smaller than the pool (so the tasks' candidates are
    merged): the same documents in the same chain order, the same rows and row domains."""
    from datasets import DatasetDict

    from effitrain.curriculum import in_context, sharded_in_context
    from effitrain.curriculum.in_context import chain_settings, chained_rows
    from effitrain.curriculum.sharded_in_context import ShardedChains
    from effitrain.data.build import build_local
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.data.splits import build_packed_splits

    for module in (in_context, sharded_in_context):
        monkeypatch.setattr(module, "_FIT_DOCS", 200)
    monkeypatch.setattr(in_context, "_SEARCH_BATCH", 128)  # several search blocks, across the files' boundaries
    monkeypatch.setattr(sharded_in_context, "_SEARCH_BATCH", 128)
    folder = tmp_path / "corpus"
    make_corpus.generate(folder, docs=600, files=5, fmt="jsonl", seed=0, ids=True, domains=make_corpus.DOMAINS[:3])
    dataset, model = _params(str(folder))
    params = _chain_params(index=index, nprobe=4)

    pool = build_local(dataset, cache_dir=tmp_path / "memory")
    tokenizer, _, _ = build_packed_splits(dataset, model, DatasetDict(train=pool["train"], eval=pool["eval"]),
                                          cache_dir=tmp_path / "memory", tokenizer_corpus=pool["train"])
    expected = chained_rows(pool["train"], tokenizer, 64, **chain_settings(params))

    order = ShardedChains(params)
    _, shards, _ = build_sharded_splits(dataset, model, EngineSettings("local", tasks=3),
                                        cache_dir=tmp_path / "sharded", order=order)
    assert shards.packed_order == "in_context"
    assert order.info["index"] == ("Flat" if index == "flat" else "IVF128,PQ4")
    assert order.info["documents"] == len(pool["train"])
    assert np.array_equal(shards.rows[np.arange(len(shards))], np.asarray(expected["rows"]))
    assert np.array_equal(shards.domains(), np.asarray(expected["domain"]))
    # the order itself: the in-memory positions are the pool's train documents, in (file, record) order
    pairs = np.load(next((tmp_path / "sharded").glob("data_order/*/order.npy")))
    assert len(pairs) == len(expected["order"]) > 500
    records = [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in open(f)]
    by_id = {r["id"]: (k, r) for k, r in enumerate(records)}
    ids = pool["train"]["id"]
    file_starts = np.cumsum([0] + [sum(1 for _ in open(f)) for f in sorted(folder.glob("*.jsonl"))])
    as_pairs = []
    for i in np.asarray(expected["order"]).tolist():
        k = by_id[ids[i]][0]
        f = int(np.searchsorted(file_starts, k, side="right")) - 1
        as_pairs.append((f, k - int(file_starts[f])))
    assert pairs.tolist() == [list(p) for p in as_pairs]


def test_the_index_scales_with_the_corpus_as_the_authors_did():
    """Exact up to 100k documents; above, about 4 sqrt(n) inverted lists (a power of two) and 4 dimensions a PQ
    byte -- the authors' IVF32768,PQ256 on 768 dimensions at 635M documents is the same order of scaling."""
    from effitrain.curriculum.in_context import index_spec

    assert index_spec(100_000, 128, "auto") == "Flat"
    assert index_spec(100_001, 128, "auto") == "IVF1024,PQ32"
    assert index_spec(1_000_000, 128, "auto") == "IVF4096,PQ32"
    assert index_spec(1_000, 128, "ivfpq") == "IVF128,PQ32" and index_spec(10**9, 64, "flat") == "Flat"


def test_the_sharded_chain_drops_a_near_duplicate_read_back_from_disk(tmp_path, monkeypatch):
    """A document that repeats another's first 100 characters (non-ASCII, so byte and character offsets differ)
    is its nearest neighbour, follows it in the chain and is dropped by the filter; every other train document is
    packed exactly once, and a row's domain is that of the document its first token belongs to -- read three
    documents a block, so rows and documents straddle the blocks."""
    from effitrain.curriculum.sharded_in_context import ShardedChains
    from effitrain.data import sharded
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits

    monkeypatch.setattr(sharded, "_READ_BLOCK", 64 * 3)  # 3 documents a block in the chain-order pack

    folder = tmp_path / "corpus"
    make_corpus.generate(folder, docs=200, files=3, fmt="jsonl", seed=0, ids=True, domains=make_corpus.DOMAINS[:2])
    twin = "Café naïveté — the façade's crème brûlée, déjà vu. " * 4
    with open(folder / "part-00003.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "twin-a", "text": twin + "One ending.", "domain": "news"}) + "\n")
        fh.write(json.dumps({"id": "twin-b", "text": twin + "Another ending!", "domain": "forum"}) + "\n")
    dataset, model = _params(str(folder))
    order = ShardedChains(_chain_params())
    tokenizer, shards, _ = build_sharded_splits(dataset, model, EngineSettings("local", tasks=2),
                                                cache_dir=tmp_path / "cache", order=order)
    pairs = np.load(next((tmp_path / "cache").glob("data_order/*/order.npy"))).tolist()
    assert order.info["kept_documents"] == order.info["documents"] - 1
    assert ([3, 0] in pairs) != ([3, 1] in pairs)  # one twin kept, the other dropped
    assert len({tuple(p) for p in pairs}) == len(pairs)  # no document twice
    eval_docs = np.load(next((tmp_path / "cache").glob("data_scan/*/eval_docs.npy"))).tolist()
    assert not [p for p in pairs if p in eval_docs]  # no held-out document is chained

    # the rows are the kept documents' tokens in chain order, each followed by EOS
    lines = {f: [json.loads(line) for line in open(folder / f"part-{f:05d}.jsonl")] for f in range(4)}
    stream, starts, domains = [], [], []
    for f, r in pairs:
        starts.append(len(stream))
        domains.append(lines[f][r]["domain"])
        stream += tokenizer(lines[f][r]["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 64
    assert len(shards) == n > 20
    assert np.array_equal(shards.rows[np.arange(n)].ravel(), np.asarray(stream[:n * 64]))
    first = np.searchsorted(starts, np.arange(n) * 64, side="right") - 1
    assert shards.domains().tolist() == [domains[i] for i in first]


def test_a_run_trains_from_the_chained_shards(tmp_path):
    """The recipe with data.executor: its contexts come from the token shards packed in chain order, and the run
    summary says how the chains were built."""
    summary, index = train_on_token_shards(tmp_path, "in_context_pretraining", "curriculum.n_features=4096",
                                           "curriculum.embed_dims=16")
    selection = summary["selection"]
    assert selection["order"]["curriculum"] == "in_context" and selection["order"]["index"] == "Flat"
    assert index["order"] == "in_context" and summary["train_sequences"] == index["rows"]
    assert summary["steps"] == 3


def test_random_reads_over_many_token_streams_hold_a_bounded_number_of_files_open(tmp_path):
    """Chain order jumps between files; a corpus of thousands of files has more streams than ``ulimit -n``, so the
    pack reduce keeps at most ``limit`` of them open, the least recently used closed first."""
    from effitrain.data.sharded import _Preads

    paths = []
    for k in range(5):
        paths.append(tmp_path / f"s{k}.bin")
        paths[-1].write_bytes(bytes(range(k * 10, k * 10 + 10)))
    before = len(os.listdir("/proc/self/fd"))
    reads = _Preads(limit=2)
    got = [reads.read(paths[k], 2, 3)[0] for k in (0, 1, 2, 0, 4, 3)]
    assert got == [3, 13, 23, 3, 43, 33]
    assert list(reads.open) == [paths[4], paths[3]]  # the two most recently read
    assert len(os.listdir("/proc/self/fd")) - before == 2
    reads.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_run_summary_counts_the_chained_rows_it_trained_on(tmp_path, monkeypatch):
    """In memory the curriculum re-packs the documents into its own rows; the summary's training sequences (and
    so its data passes) are those rows, not the plain packing's."""
    from effitrain.config.compose import compose_config
    from effitrain.pipeline import run as train

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    overrides = [*TINY, "+recipe=in_context_pretraining", "curriculum.n_features=4096", "curriculum.embed_dims=16",
                 "train.max_steps=2", f"run_dir={tmp_path / 'run'}"]
    composed = compose_config(overrides)
    summary = train(composed.cfg, run_dir=tmp_path / "run", argv=["effitrain", *overrides], recipes=composed.recipes)
    (chained,) = (tmp_path / "cache" / "in_context").glob("*/rows.npy")
    rows = len(np.load(chained, mmap_mode="r"))
    assert summary["train_sequences"] == rows
    assert summary["data_passes"] == pytest.approx(summary["tokens"] / (rows * 64))
