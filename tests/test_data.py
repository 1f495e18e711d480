"""The data pipeline: demo corpus, local files, the trained BPE, packing and the build-once cache.

Caches go to the session's temporary EFFITRAIN_CACHE (tests/conftest.py); sizes are small so the file runs in
seconds on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from effitrain.config.blocks.dataset import DemoParams, LocalParams
from effitrain.config.blocks.model import LlamaParams
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError

SMALL = dict(max_docs_per_domain=40, eval_examples_per_domain=6, seed=0)


COLD_BUILD_SECONDS = {}


@pytest.fixture(scope="module")
def demo():
    from effitrain.data.build import build_demo

    start = time.perf_counter()
    dd = build_demo(DemoParams(**SMALL))  # cold: the session's cache starts empty
    COLD_BUILD_SECONDS["demo"] = time.perf_counter() - start
    return dd


@pytest.fixture(scope="module")
def bpe(demo):
    from effitrain.data.tokenizer import build_tokenizer

    return build_tokenizer(LlamaParams(vocab_size=400), demo["train"])


def _rows(ds):
    return list(zip(ds["id"], ds["text"], ds["domain"]))


# ---------------------------------------------------------------------------------------------------- demo corpus

def test_demo_has_every_domain_with_the_schema(demo):
    from effitrain.data.demo import DEMO_DOMAINS

    assert set(demo) == {"train", "eval"}
    for split, per_domain in (("train", SMALL["max_docs_per_domain"]), ("eval", SMALL["eval_examples_per_domain"])):
        ds = demo[split]
        assert ds.column_names == ["id", "text", "domain"]
        counts = {d: ds["domain"].count(d) for d in DEMO_DOMAINS}
        assert counts == {d: per_domain for d in DEMO_DOMAINS}, (split, counts)
        assert all(isinstance(t, str) and t.strip() for t in ds["text"])
        assert all(i.startswith(d + "-") for i, d in zip(ds["id"], ds["domain"]))


def test_demo_eval_is_disjoint_from_train(demo):
    train_ids, eval_ids = set(demo["train"]["id"]), set(demo["eval"]["id"])
    assert len(train_ids) == len(demo["train"]) and len(eval_ids) == len(demo["eval"])
    assert not train_ids & eval_ids
    assert not set(demo["train"]["text"]) & set(demo["eval"]["text"])
    # eval takes whole files/topics: no source group is shared (ids are <domain>-<group>-<chunk>)
    group = lambda i: i.rsplit("-", 1)[0]  # noqa: E731
    shared = {group(i) for i in train_ids if not i.startswith("arithmetic")} & \
             {group(i) for i in eval_ids if not i.startswith("arithmetic")}
    assert not shared


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


# Run in a fresh interpreter with its own cache: a cold build of the demo corpus and of the BPE trained on it.
_OTHER_PROCESS = """
import hashlib, json, sys
from effitrain.config.blocks.dataset import DemoParams
from effitrain.config.blocks.model import LlamaParams
from effitrain.data.build import build_demo
from effitrain.data.tokenizer import build_tokenizer
dd = build_demo(DemoParams(**json.loads(sys.argv[2])), cache_dir=sys.argv[1])
rows = [list(zip(dd[s]["id"], dd[s]["text"], dd[s]["domain"])) for s in ("train", "eval")]
print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())
tok = build_tokenizer(LlamaParams(vocab_size=400), dd["train"], cache_dir=sys.argv[1])
print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())
"""


def test_demo_and_bpe_are_identical_in_another_process(tmp_path, demo, bpe):
    """Two cold builds in two interpreters (another hash seed, another cache) give the same corpus and the same
    BPE: ranks with node-local caches must agree on every document and every token id."""
    from effitrain.data.demo import make_demo_docs

    out = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "cache"), json.dumps(SMALL)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    corpus_digest, bpe_digest = out.stdout.strip().splitlines()[-2:]
    assert corpus_digest == _digest([[list(r) for r in _rows(demo[s])] for s in ("train", "eval")])
    assert bpe_digest == hashlib.sha256(bpe.backend_tokenizer.to_str().encode()).hexdigest()
    assert make_demo_docs(20, 3, 5) != make_demo_docs(20, 3, 6)  # the seed matters


def test_demo_ids_are_stable_when_the_cap_grows():
    from effitrain.data.demo import make_demo_docs

    small_train, small_eval = make_demo_docs(10, 3, 0, ["code", "arithmetic", "prose"])
    big_train, big_eval = make_demo_docs(25, 3, 0, ["code", "arithmetic", "prose"])
    assert small_eval == big_eval
    for domain in ("code", "arithmetic", "prose"):
        small = [d for d in small_train if d["domain"] == domain]
        big = [d for d in big_train if d["domain"] == domain]
        assert big[:len(small)] == small


def test_demo_domain_filter(tmp_path):
    from effitrain.data.build import build_demo

    dd = build_demo(DemoParams(**SMALL, domains=["arithmetic", "prose"]), cache_dir=tmp_path)
    assert sorted(set(dd["train"]["domain"])) == ["arithmetic", "prose"]
    with pytest.raises(ConfigError, match=r"dataset.domains: unknown domain 'cod'.*did you mean 'code'.*valid"):
        build_demo(DemoParams(**SMALL, domains=["cod"]))


def test_demo_builder_is_reachable_from_the_registry_and_cached(demo):
    load_builtin_blocks()
    block = REGISTRY.parse("dataset", {"name": "demo", **SMALL})
    start = time.perf_counter()
    dd = block.build()
    assert time.perf_counter() - start < 2.0  # a warm build memory-maps the cached copy
    assert _rows(dd["train"]) == _rows(demo["train"])


def test_small_cold_demo_build_is_fast(demo):
    assert COLD_BUILD_SECONDS["demo"] < 15.0  # seconds of work on two cores, generous for a loaded machine


# ---------------------------------------------------------------------------------------------------- local files

def _write_jsonl(path: Path, n: int, domains=("news", "code")) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"body": f"document {i} about {domains[i % len(domains)]}", "src": domains[i % 2],
                                "extra": i}) + "\n")
    return path


def test_local_jsonl_with_domains_and_held_out_eval(tmp_path):
    from effitrain.data.build import build_local

    path = _write_jsonl(tmp_path / "docs.jsonl", 40)
    params = LocalParams(path=[str(path)], text_field="body", domain_field="src", eval_examples_per_domain=3)
    dd = build_local(params, cache_dir=tmp_path / "cache")
    assert dd["train"].column_names == ["id", "text", "domain"]
    assert len(dd["train"]) == 34 and len(dd["eval"]) == 6
    assert sorted(dd["eval"]["domain"]) == ["code"] * 3 + ["news"] * 3
    assert not set(dd["train"]["id"]) & set(dd["eval"]["id"])
    again = build_local(params, cache_dir=tmp_path / "cache")
    assert _rows(again["eval"]) == _rows(dd["eval"])  # the hold-out is deterministic

    only = build_local(LocalParams(path=[str(path)], text_field="body", domain_field="src",
                                   eval_examples_per_domain=3, domains=["news"]), cache_dir=tmp_path / "cache")
    assert set(only["train"]["domain"]) == {"news"} and set(only["eval"]["domain"]) == {"news"}
    with pytest.raises(ConfigError, match="unknown domain 'sports'.*valid: code, news"):
        build_local(LocalParams(path=[str(path)], text_field="body", domain_field="src", domains=["sports"],
                                eval_examples_per_domain=3), cache_dir=tmp_path / "cache")


def test_local_txt_and_parquet_and_eval_path(tmp_path):
    import datasets

    from effitrain.data.build import build_local

    txt = tmp_path / "a.txt"
    txt.write_text("".join(f"paragraph {i} first line\nsecond line\n\n" for i in range(12)))
    dd = build_local(LocalParams(path=[str(txt)], eval_examples_per_domain=2), cache_dir=tmp_path / "cache")
    assert len(dd["train"]) == 10 and set(dd["train"]["domain"]) == {"all"}
    assert all(t.count("\n") == 1 for t in dd["train"]["text"])  # a document is a paragraph, not a line

    pq = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"id": [f"x{i}" for i in range(10)], "text": [f"t{i}" for i in range(10)]}) \
        .to_parquet(str(pq))
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"text": f"held-out {i}"}) + "\n" for i in range(6)))
    dd = build_local(LocalParams(path=str(pq), eval_path=str(ev), text_field="text", eval_examples_per_domain=2),
                     cache_dir=tmp_path / "cache")
    assert dd["train"]["id"] == [f"x{i}" for i in range(10)]  # an id column is kept
    assert len(dd["eval"]) == 2


def test_local_errors_name_the_key(tmp_path):
    from effitrain.data.build import build_local

    with pytest.raises(ConfigError, match=r"dataset.path: file '.*missing.jsonl' does not exist"):
        build_local(LocalParams(path=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(ConfigError, match=r"dataset.path: no file matches"):
        build_local(LocalParams(path=[str(tmp_path / "*.jsonl")]))
    path = _write_jsonl(tmp_path / "docs.jsonl", 20)
    with pytest.raises(ConfigError, match=r"dataset.text_field: column 'text' not found.*columns: body, extra, src"):
        build_local(LocalParams(path=[str(path)]), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"dataset.domain_field: column 'source' not found.*did you mean 'src'"):
        build_local(LocalParams(path=[str(path)], text_field="body", domain_field="source"),
                    cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"eval_examples_per_domain: domain 'all' has only 20 documents"):
        build_local(LocalParams(path=[str(path)], text_field="body", eval_examples_per_domain=64),
                    cache_dir=tmp_path / "cache")
    odd = tmp_path / "docs.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        build_local(LocalParams(path=[str(odd)]))


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_bpe_round_trips_and_has_its_special_tokens(bpe):
    assert len(bpe) == 400
    assert bpe.eos_token == "<|endoftext|>" and bpe.pad_token == "<|pad|>"
    assert bpe.eos_token_id != bpe.pad_token_id
    for text in ("def f(x):\n    return x + 1\n", "17 + 25 = 42", "Ünïcödé ✓ 😀 and\ttabs  "):
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.eos_token_id not in ids
        assert bpe.decode(ids) == text


def test_bpe_is_cached(demo, bpe):
    from effitrain.data.tokenizer import build_tokenizer
    from effitrain.paths import cache_dir

    start = time.perf_counter()
    again = build_tokenizer(LlamaParams(vocab_size=400), demo["train"])
    assert time.perf_counter() - start < 2.0
    assert again.get_vocab() == bpe.get_vocab()
    assert len([p for p in cache_dir("tokenizers").iterdir() if p.is_dir() and not p.name.startswith(".")]) >= 1



def _build_counted(args):
    from effitrain.data.cache import build_once

    root, counter = args

    def build(tmp):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # long enough that the second process arrives while the first builds
        (tmp / "value.txt").write_text("42")

    return str(build_once("things", "key", build, cache_root=root))


def test_build_once_builds_once_across_processes(tmp_path):
    counter = tmp_path / "count.txt"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        folders = pool.map(_build_counted, [(str(tmp_path), str(counter))] * 2)
    assert folders[0] == folders[1]
    assert counter.read_text().count("built") == 1
    assert (Path(folders[0]) / "value.txt").read_text() == "42"
    assert not [p for p in (tmp_path / "things").iterdir() if p.name.startswith(".key")]  # no temporary left


def test_build_once_leaves_nothing_after_a_failed_build(tmp_path):
    from effitrain.data.cache import build_once

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_once("things", "k", broken, cache_root=tmp_path)
    assert [p.name for p in (tmp_path / "things").iterdir() if not p.name.endswith(".lock")] == []


# ---------------------------------------------------------------------------------------------------- packing

def test_pack_gives_full_rows_of_one_domain(demo, bpe):
    from effitrain.data.packing import domain_array, pack, to_numpy

    seq_len = 32
    packed = pack(demo["train"], bpe, seq_len)
    tokens = to_numpy(packed)
    domains = domain_array(packed)
    assert tokens.shape == (len(packed), seq_len) and tokens.dtype == np.int32
    assert all(len(row) == seq_len for row in packed["input_ids"])
    # per domain: the rows are exactly the domain's documents, each followed by EOS, concatenated and cut
    for domain in sorted(set(demo["train"]["domain"])):
        texts = [t for t, d in zip(demo["train"]["text"], demo["train"]["domain"]) if d == domain]
        stream = [i for t in texts for i in bpe(t, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]]
        n = len(stream) // seq_len
        rows = tokens[domains == domain]
        assert rows.shape == (n, seq_len)
        assert rows.reshape(-1).tolist() == stream[: n * seq_len]


def test_pack_is_cached_and_parallel_tokenizing_agrees(demo, bpe, tmp_path):
    from effitrain.data.packing import pack, to_numpy

    first = to_numpy(pack(demo["eval"], bpe, 16))
    start = time.perf_counter()
    cached = to_numpy(pack(demo["eval"], bpe, 16))
    assert time.perf_counter() - start < 1.0
    parallel = to_numpy(pack(demo["eval"], bpe, 16, num_proc=2, cache_dir=tmp_path))  # cold, two workers
    assert np.array_equal(first, cached) and np.array_equal(first, parallel)


def test_build_packed_splits(demo):
    from effitrain.data.packing import to_numpy
    from effitrain.data.splits import build_packed_splits

    params = DemoParams(**SMALL, seq_len=24)
    tokenizer, train, eval_by_domain = build_packed_splits(params, LlamaParams(vocab_size=400), demo)
    assert len(tokenizer) == 400
    assert sorted(eval_by_domain) == ["arithmetic", "code", "docstrings", "prose"]
    for domain, ds in eval_by_domain.items():
        assert len(ds) > 0 and set(ds["domain"]) == {domain}
        assert to_numpy(ds).shape == (len(ds), 24)
    assert to_numpy(train).max() < len(tokenizer)

    with pytest.raises(ConfigError, match="eval_examples_per_domain.*less than one sequence"):
        build_packed_splits(DemoParams(**SMALL, seq_len=4096), LlamaParams(vocab_size=400), demo)


def test_a_record_without_an_id_among_records_with_ids_is_numbered_by_its_row():
    """Not 'None': records sharing one id would be held out (ranked by id) all together or not at all."""
    import datasets

    from effitrain.data.sources import standardize

    ds = datasets.Dataset.from_list([{"id": "a", "text": "one"}, {"id": None, "text": "two"},
                                     {"id": "c", "text": "three"}, {"id": None, "text": "four"}])
    out = standardize(ds, text_field="text", domain_field=None, key="dataset", id_prefix="train")
    assert out["id"] == ["a", "train-000000001", "c", "train-000000003"]
