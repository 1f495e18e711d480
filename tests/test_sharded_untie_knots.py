"""Untie the Knots on the sharded corpus (issue 24, ``curriculum=untie_knots`` with ``data.executor``): the pack
reduce knots the train documents row by row, reading each from its token stream when its row is built
(:func:`effitrain.data.knots.knotted_row_stream`), and writes the rows with their loss mask into token shards.

* on a small pool the knotted rows, their mask, knotted flags and domains equal the in-memory curriculum's, and the
  sampler built on the shards hands out the same batches and labels;
* a run trains from the knotted shards;
* a future curriculum that re-packs documents without a sharded form is still refused at ``check``.
"""

from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, train_on_token_shards

sys.path.insert(0, str(REPO / "scripts"))
import make_corpus  # noqa: E402  (scripts/ is not a package)


def _params(path: str):
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams

    load_builtin_blocks()
    return (LocalParams(path=[path], domain_field="domain", eval_examples_per_domain=4, seq_len=128),
            LlamaParams(vocab_size=512))


@pytest.mark.parametrize("preserve_partial_order", [False, True])
def test_sharded_knotted_rows_are_the_in_memory_rows_and_batches(tmp_path, monkeypatch, preserve_partial_order):
    """300 documents in 3 files, 3 tasks, the rows copied into the shards 5 at a time: the same knotted rows, masks,
    flags and row domains as in memory, and the same batches and labels."""
    from datasets import DatasetDict

    from effitrain.curriculum.meco import training_labels
    from effitrain.curriculum.untie_knots import UntieKnotsSampler, knotted
    from effitrain.data import sharded
    from effitrain.data.build import build_local
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.data.splits import build_packed_splits

    monkeypatch.setattr(sharded, "_READ_BLOCK", 128 * 5)
    folder = tmp_path / "corpus"
    make_corpus.generate(folder, docs=300, files=3, fmt="jsonl", seed=0, ids=True, domains=make_corpus.DOMAINS[:3])
    dataset, model = _params(str(folder))
    settings = dict(chunks_per_doc=3, knot_probability=0.5, preserve_partial_order=preserve_partial_order, seed=7)

    pool = build_local(dataset, cache_dir=tmp_path / "memory")
    tokenizer, _, _ = build_packed_splits(dataset, model, DatasetDict(train=pool["train"], eval=pool["eval"]),
                                          cache_dir=tmp_path / "memory", tokenizer_corpus=pool["train"])
    expected = knotted(pool["train"], tokenizer, 128, cache_root=tmp_path / "memory", **settings)

    _, shards, _ = build_sharded_splits(dataset, model, EngineSettings("local", tasks=3),
                                        cache_dir=tmp_path / "sharded", knots=tuple(settings.values()))
    n = len(shards)
    assert shards.packed_order == "untie_knots" and n == len(expected["rows"]) > 100
    assert np.array_equal(shards.rows[np.arange(n)], np.asarray(expected["rows"]))
    assert np.array_equal(shards.row_mask()[np.arange(n)], np.asarray(expected["mask"]))
    assert np.array_equal(shards.knotted(), np.asarray(expected["knotted"])) and 0 < shards.knotted().sum() < n
    assert np.array_equal(shards.domains(), np.asarray(expected["domain"]))
    assert not list(shards.folder.glob(".knotted*"))  # the scratch files went with the pack

    layout = dict(seed=3, micro_batch_size=2, grad_accum=2, world_size=1, rank=0)
    on_disk = UntieKnotsSampler({"rows": shards.rows, "mask": shards.row_mask(), "domain": shards.domains(),
                                 "knotted": shards.knotted()}, **layout)
    in_ram = UntieKnotsSampler(expected, **layout)
    import torch
    for a, b in zip(itertools.islice(iter(on_disk), 12), itertools.islice(iter(in_ram), 12)):
        assert a == b
        ids = torch.from_numpy(np.asarray(on_disk.train_rows[a])).long()
        assert torch.equal(training_labels(ids, on_disk.mask[np.asarray(a)]),
                           training_labels(ids, in_ram.mask[np.asarray(b)]))


def test_a_run_trains_from_the_knotted_shards(tmp_path):
    summary, index = train_on_token_shards(tmp_path, "untie_knots", steps=3)
    assert index["order"] == "untie_knots" and summary["train_sequences"] == index["rows"] > 0
    assert summary["steps"] == 3


def test_a_curriculum_that_repacks_documents_without_a_sharded_form_is_refused():
    """Every curriculum that reads the documents has a sharded form now (in_context, meco, untie_knots); the rule
    still refuses one that would not, naming the alternatives."""
    from effitrain.config.blocks.data_engine import _executor_curricula

    class Repacks:
        needs_documents = True

    spec = SimpleNamespace(data=SimpleNamespace(executor="local"),
                           block=lambda name: SimpleNamespace(name="future", params=Repacks()))
    message = _executor_curricula(spec, None)
    assert message.startswith("curriculum=future re-packs the documents, which the sharded data engine does not do")
    assert "in_context, meco, untie_knots" in message
    spec.data.executor = None
    assert _executor_curricula(spec, None) is None
