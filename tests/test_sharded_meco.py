"""MeCo's metadata conditioning on the sharded corpus (issue 24, ``curriculum=meco`` with ``data.executor``): the
tokenize tasks write every train document a second time after its header (``prefix + domain + suffix``) with a loss
mask, and the pack reduce cuts those streams into the *conditioned* rows beside the plain ones.

* on a small pool the conditioned rows, their mask and domains equal the in-memory packing's
  (:func:`effitrain.curriculum.meco.conditioned_rows`), and the sampler built on the shards hands out the same
  batches and loss masks as the one built in memory;
* a run trains from the shards' two packings;
* ``check`` lets MeCo through with ``data.executor`` when it conditions on the domain, and says why not otherwise.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, train_on_token_shards

sys.path.insert(0, str(REPO / "scripts"))
import make_corpus  # noqa: E402  (scripts/ is not a package)

HEADER = ("domain", "URL: ", "\n\n")


def _params(path: str):
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams

    load_builtin_blocks()
    return (LocalParams(path=[path], domain_field="domain", eval_examples_per_domain=4, seq_len=64),
            LlamaParams(vocab_size=512))


@pytest.mark.parametrize("field", ["domain", "id"])
def test_sharded_conditioned_rows_are_the_in_memory_rows_and_batches(tmp_path, monkeypatch, field):
    """400 documents in 3 files, 3 tasks, the pack reduce reading 100 tokens a block (rows and documents straddle
    the blocks): the same conditioned rows, masks and domains, the same plain rows, the same batches -- with the
    domain as metadata, and with the documents' own ids."""
    from datasets import DatasetDict

    from effitrain.curriculum.meco import MecoSampler, conditioned_rows
    from effitrain.data import sharded
    from effitrain.data.build import build_local
    from effitrain.data.engine import EngineSettings
    from effitrain.data.packing import to_numpy
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.data.splits import build_packed_splits
    from effitrain.timeline import parse_timeline

    monkeypatch.setattr(sharded, "_READ_BLOCK", 100)
    folder = tmp_path / "corpus"
    make_corpus.generate(folder, docs=400, files=3, fmt="jsonl", seed=0, ids=True, domains=make_corpus.DOMAINS[:3])
    dataset, model = _params(str(folder))

    pool = build_local(dataset, cache_dir=tmp_path / "memory")
    tokenizer, packed, _ = build_packed_splits(dataset, model, DatasetDict(train=pool["train"], eval=pool["eval"]),
                                               cache_dir=tmp_path / "memory", tokenizer_corpus=pool["train"])
    _, prefix, suffix = HEADER
    expected = conditioned_rows(pool["train"], tokenizer, 64, metadata_field=field, prefix=prefix, suffix=suffix,
                                cache_root=tmp_path / "memory")

    _, shards, _ = build_sharded_splits(dataset, model, EngineSettings("local", tasks=3),
                                        cache_dir=tmp_path / "sharded", condition=(field, prefix, suffix))
    got = shards.conditioned()
    n = len(got["rows"])
    assert n == len(expected["rows"]) > len(shards) > 100  # the headers add tokens, so rows
    assert np.array_equal(got["rows"][np.arange(n)], np.asarray(expected["rows"]))
    assert np.array_equal(got["mask"][np.arange(n)], np.asarray(expected["mask"]))
    assert np.array_equal(shards.domain_names[np.asarray(got["domain_codes"])], np.asarray(expected["domain"]))
    assert np.array_equal(shards.rows[np.arange(len(shards))], to_numpy(packed))
    # the mask is False exactly on the header tokens: the first row starts with the header of the first document of
    # the first domain (domains are packed in sorted order)
    domains = pool["train"]["domain"]
    first_doc = pool["train"][domains.index(min(domains))]
    header = tokenizer(f"{prefix}{first_doc[field]}{suffix}", add_special_tokens=False)["input_ids"]
    first = got["rows"][0]
    assert first[:len(header)].tolist() == header and not got["mask"][0][:len(header)].any()
    assert got["mask"][0][len(header)]  # the document's first token is a target

    timeline = parse_timeline({"phases": {"unit": "fraction", "intervals": {"conditioning": [0, 0.5],
                                                                            "cooldown": [0.5, 1.0]}}}) \
        .resolve(max_steps=8, tokens_per_step=4 * 64)
    layout = dict(cooldown_phase="cooldown", mask_metadata_loss=True, seed=3, micro_batch_size=2, grad_accum=2,
                  world_size=1, rank=0)
    on_disk = MecoSampler(got, shards.rows, timeline, **layout)
    in_ram = MecoSampler(expected, to_numpy(packed), timeline, **layout)
    for a, b in zip(itertools.islice(iter(on_disk), 16), itertools.islice(iter(in_ram), 16)):
        assert a == b
        assert np.array_equal(on_disk.train_rows[a], in_ram.train_rows[b])
        mask_a, mask_b = on_disk.target_mask(a), in_ram.target_mask(b)
        assert (mask_a is None) == (mask_b is None) and (mask_a is None or np.array_equal(mask_a, mask_b))
    assert on_disk.drawn == [8, 8]  # 4 conditioned steps, then 4 plain ones


def test_a_meco_run_trains_from_the_shards_conditioned_then_plain(tmp_path):
    summary, index = train_on_token_shards(tmp_path, "meco", steps=4)
    assert index["conditioned_rows"] > index["rows"] > 0 and summary["steps"] == 4
    assert summary["train_sequences"] == index["conditioned_rows"] + index["rows"]


def test_check_lets_an_id_conditioned_meco_through_with_data_executor(tmp_path, capsys):
    """(With the domain as metadata: tests/test_data_engine.py, every curriculum with a sharded form.)"""
    from effitrain.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 30, "id": f"d{i}"}) + "\n" for i in range(50)))
    capsys.readouterr()
    code = main(["check", "dataset=local", f"dataset.path={corpus}", "dataset.eval_examples_per_domain=4",
                 "data.executor=local", "+recipe=meco", "curriculum.metadata_field=id"])
    assert code == 0, capsys.readouterr().err


def test_a_record_without_an_id_stops_an_id_conditioned_run_in_one_line(tmp_path):
    """In memory a record without an id is numbered by its position in the whole corpus, which a tokenize task does
    not know: the task that meets one stops the launch with the file and record, exit 2, nothing trained."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [{"text": f"document {i} " * 20, "id": f"d{i}"} for i in range(60)]
    del records[41]["id"]
    (corpus / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["+recipe=meco", "dataset=local", f"dataset.path={corpus}", "dataset.eval_examples_per_domain=4",
            "data.executor=local", "curriculum.metadata_field=id", "train.max_steps=1", f"run_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "effitrain.cli", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
    assert err[0].startswith("effitrain: error: curriculum.metadata_field=id: ") and "record 42 has no 'id'" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
