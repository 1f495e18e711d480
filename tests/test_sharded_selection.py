"""Selection on the sharded data engine (issue 24, deliverable 2): DSIR as map then reduce.

* the sharded DSIR keeps exactly the documents the in-memory DSIR keeps (same documents, same pool order), with 1
  and 3 tasks, with a target domain drawn from the pool and with a budget in tokens or in examples;
* only the kept documents are tokenized and packed: the token shards are the rows the in-memory path packs from its
  selection;
* a relaunch after a failed task reruns only that task and selects the same documents;
* ``check`` accepts dsir with ``data.executor`` and refuses the selections without a sharded form in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_data_engine import _check, _corpus, _in_memory_rows, _params

SEED = 3


def _selection(unit: str):
    from effitrain.registry import REGISTRY

    # min_length 230 drops some documents of the generated corpus (1-2 KB each), so the filter is exercised
    return REGISTRY.parse("selection", {"name": "dsir", "target": {"domain": "science", "max_examples": 10},
                                        "budget": {"fraction": 0.3, "unit": unit},
                                        "scorer": {"min_length": 230, "pool_mix": 0.1}}, "selection")


def _ids_of(pairs: np.ndarray, files: list[str]) -> list[str]:
    """The records' own ids of ``(file, record)`` pairs, in the pairs' order."""
    from effitrain.data.records import RecordFile

    ids = {}
    for f in sorted({int(f) for f, _ in pairs}):
        for record in RecordFile(files[f], "json", text_field="text", domain_field="domain"):
            ids[(f, record.index)] = record.doc_id
    return [ids[(int(f), int(r))] for f, r in pairs]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("dsir") / "corpus", docs=360, files=5)


@pytest.mark.parametrize("tasks, unit, block", [(1, "tokens", None), (3, "tokens", None), (3, "examples", None),
                                                (2, "tokens", 97)])
def test_sharded_dsir_keeps_exactly_the_in_memory_selection(corpus, tmp_path, monkeypatch, tasks, unit, block):
    """``block``: the tasks hash, write and score the bucket ids in blocks of that many (a few documents each)
    instead of one block per file -- the same selection, to the bit."""
    from effitrain.data.build import build_local
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits, corpus_files
    from effitrain.selection import sharded_dsir
    from effitrain.selection.sharded_dsir import ShardedDSIR

    if block is not None:
        monkeypatch.setattr(sharded_dsir, "_BLOCK", block)

    dataset, model = _params(str(corpus))
    cache = tmp_path / "cache"
    block = _selection(unit)
    pool = build_local(dataset, cache_dir=cache)
    in_memory = block.build(pool, cache_dir=str(cache / "selection"), seed=SEED)
    expected = list(in_memory.train["id"])

    sharded = ShardedDSIR(block.params, seed=SEED)
    build_sharded_splits(dataset, model, EngineSettings("local", tasks=tasks), cache_dir=cache, selection=sharded)
    folder = Path(sharded.info["manifest"])
    got = _ids_of(np.load(folder / "selected.npy"), corpus_files([str(corpus)]))

    info = in_memory.info
    assert got == expected
    # not a trivial selection: the length filter dropped some, the budget kept a part of the rest
    assert info["after_filter_examples"] < info["pool_examples"] and 0 < len(expected) < info["after_filter_examples"]
    assert sharded.info["pool_examples"] == info["pool_examples"]
    assert sharded.info["after_filter_examples"] == info["after_filter_examples"]
    assert sharded.info["target_examples"] == info["target_examples"] == 10
    # another seed draws other Gumbel keys (and another target): the equality above is not a fixed point
    other = ShardedDSIR(block.params, seed=SEED + 1)
    build_sharded_splits(dataset, model, EngineSettings("local", tasks=tasks), cache_dir=cache, selection=other)
    assert _ids_of(np.load(Path(other.info["manifest"]) / "selected.npy"), corpus_files([str(corpus)])) != got


def test_only_the_selected_documents_are_packed(corpus, tmp_path):
    """The token shards of a sharded dsir run are the rows the in-memory path packs from its selection (the
    tokenizer still trained on the whole pool), and the eval rows are the whole hold-out, as in memory."""
    from datasets import DatasetDict

    from effitrain.data import build as build_module
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.selection.sharded_dsir import ShardedDSIR

    dataset, model = _params(str(corpus))
    cache = tmp_path / "cache"
    block = _selection("tokens")
    pool = build_module.build_local(dataset, cache_dir=cache)
    selected = block.build(pool, cache_dir=str(cache / "selection"), seed=SEED).train

    from effitrain.data.packing import domain_array, to_numpy
    from effitrain.data.splits import build_packed_splits

    tokenizer, train, eval_by_domain = build_packed_splits(
        dataset, model, DatasetDict(train=selected, eval=pool["eval"]), cache_dir=cache,
        tokenizer_corpus=pool["train"])
    rows = to_numpy(train)
    _, shards, sharded_eval = build_sharded_splits(dataset, model, EngineSettings("local", tasks=2), cache_dir=cache,
                                                   selection=ShardedDSIR(block.params, seed=SEED))
    _, all_rows, _, _ = _in_memory_rows(dataset, model, tmp_path / "cache2")
    assert 0 < len(rows) < len(all_rows) * 0.6
    assert np.array_equal(shards.rows[np.arange(len(shards))], rows)
    assert np.array_equal(shards.domains(), domain_array(train))
    for domain, expected in eval_by_domain.items():
        assert np.array_equal(sharded_eval[domain], np.asarray(to_numpy(expected))), domain


@pytest.mark.parametrize("args, expected", [
    (["selection=s2l"], ["selection=s2l stays on one node",
                                      "use selection=none, dsir, dedup, quality_classifier, perplexity, zip_fit"]),
    (["selection=dsir", "selection.target.split=eval"], ["selection.target.split=eval", "split=train"]),
])
def test_check_refuses_selections_without_a_sharded_form(args, expected, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}", "domain": "a"}) + "\n" for i in range(50)))
    code, err = _check(["dataset=local", f"dataset.path={corpus}", "data.executor=local", *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("effitrain: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_check_accepts_dsir_with_data_executor(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 40, "domain": "a" if i % 2 else "b"}) + "\n"
                              for i in range(50)))
    code, err = _check(["dataset=local", f"dataset.path={corpus}", "dataset.domain_field=domain",
                        "dataset.eval_examples_per_domain=4", "data.executor=local", "data.tasks=2", "+recipe=dsir",
                        "selection.target.domain=a"], capsys)
    assert code == 0, err


def test_a_relaunch_after_a_failed_task_reruns_only_that_task(corpus, tmp_path, monkeypatch, capsys):
    """A keys task that dies stops the launch; launching again skips the finished count
    stage and the finished keys task, runs only the failed one, and selects the same documents."""
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.selection import sharded_dsir

    dataset, model = _params(str(corpus))
    block = _selection("tokens")
    reference = sharded_dsir.ShardedDSIR(block.params, seed=SEED)
    build_sharded_splits(dataset, model, EngineSettings("local", tasks=2), cache_dir=tmp_path / "a",
                         selection=reference)

    real_run = sharded_dsir.DsirKeys.run

    def dies_on_task_1(self, data=None, rank=0, world_size=1):
        if rank == 1:
            raise RuntimeError("node lost")
        return real_run(self, data, rank, world_size)

    monkeypatch.setattr(sharded_dsir.DsirKeys, "run", dies_on_task_1)
    with pytest.raises(RuntimeError, match="node lost"):  # datatrove's local executor re-raises a task's error
        build_sharded_splits(dataset, model, EngineSettings("local", tasks=2), cache_dir=tmp_path / "b",
                             selection=sharded_dsir.ShardedDSIR(block.params, seed=SEED))
    monkeypatch.setattr(sharded_dsir.DsirKeys, "run", real_run)
    capsys.readouterr()
    again = sharded_dsir.ShardedDSIR(block.params, seed=SEED)
    build_sharded_splits(dataset, model, EngineSettings("local", tasks=2), cache_dir=tmp_path / "b", selection=again)
    out = capsys.readouterr().out
    assert "dsir-count" not in out, out
    assert "dsir-keys: 1 of 2 tasks to run (1 done by an earlier launch; running task 1) on local" in out, out
    assert np.array_equal(np.load(Path(again.info["manifest"]) / "selected.npy"),
                          np.load(Path(reference.info["manifest"]) / "selected.npy"))
