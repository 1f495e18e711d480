"""Score-then-budget selections and MinHash dedup on the sharded data engine (issue 24, deliverable 2).

* ``quality_classifier``, ``zip_fit``, ``random`` and ``perplexity`` (its pool proxy trained in the reduce, the
  in-memory batches straddling files) keep exactly the documents the in-memory selection keeps, with 1 and 3 tasks,
  with the ``topk`` and ``window`` cuts; so does ``diversity_kmeans`` (mini-batch k-means on the memory-mapped
  embeddings);
* ``dedup`` keeps exactly the in-memory representatives (the first in pool order: a copy in an earlier file wins
  over its original), with word and character shingles;
* a launch SIGKILLed mid-score and launched again reruns only the unfinished score tasks and selects the same
  documents;
* ``check`` accepts these with ``data.executor`` and refuses LESS and S2L in one line naming what runs sharded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from test_data_engine import _check, _corpus, _params
from test_sharded_selection import _ids_of

SEED = 3
TARGET = {"domain": "science", "max_examples": 10}
CASES = {  # method -> selection overrides: each cut (topk, window high and medium, random) at least once
    "quality_classifier": {"budget": {"fraction": 0.3, "unit": "tokens"}},
    "zip_fit": {"scorer": {"max_target": 4}, "selector": {"name": "window", "position": "high"},
                "budget": {"fraction": 0.3, "unit": "examples"}},
    "random": {"budget": {"fraction": 0.3, "unit": "tokens"}},
    "perplexity": {"scorer": {"proxy_steps": 20, "batch_size": 7}, "budget": {"fraction": 0.3, "unit": "tokens"}},
}


def _block(method: str, overrides: dict):
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    return REGISTRY.parse("selection", {"name": method, **({"target": TARGET} if method != "dedup" else {}),
                                        **overrides}, "selection")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("scored") / "corpus", docs=360, files=5)


_IN_MEMORY: dict = {}


def _in_memory(corpus: Path, cache: Path, block, key: str) -> list[str]:
    """The in-memory selection's document ids (computed once per case and module)."""
    if key not in _IN_MEMORY:
        from effitrain.data.build import build_local

        dataset, _ = _params(str(corpus))
        pool = build_local(dataset, cache_dir=cache)
        selection = block.build(pool, cache_dir=str(cache / "selection"), seed=SEED)
        _IN_MEMORY[key] = (list(selection.train["id"]), selection.info)
    return _IN_MEMORY[key]


def _sharded(corpus: Path, cache: Path, method: str, block, tasks: int, seed: int = SEED):
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits, corpus_files
    from effitrain.selection.sharded import sharded_selection

    dataset, model = _params(str(corpus))
    hook = sharded_selection(method, block.params, seed=seed)
    build_sharded_splits(dataset, model, EngineSettings("local", tasks=tasks), cache_dir=cache, selection=hook)
    return _ids_of(np.load(Path(hook.info["manifest"]) / "selected.npy"), corpus_files([str(corpus)])), hook.info


@pytest.mark.parametrize("method, tasks", [("quality_classifier", 1), ("quality_classifier", 3), ("zip_fit", 3),
                                           ("random", 3), ("perplexity", 1), ("perplexity", 3)])
def test_sharded_scoring_keeps_exactly_the_in_memory_selection(corpus, tmp_path_factory, tmp_path, method, tasks):
    block = _block(method, CASES[method])
    expected, info = _in_memory(corpus, tmp_path_factory.mktemp("memory"), block, method)
    got, sharded_info = _sharded(corpus, tmp_path, method, block, tasks)
    assert got == expected
    assert 0 < len(expected) < 0.5 * info["pool_examples"]  # a cut, not the whole pool
    assert sharded_info["pool_examples"] == info["pool_examples"] and sharded_info["target_examples"] == 10
    if method == "quality_classifier" and tasks == 3:
        # the classifier's training accuracy, from the same negatives; another seed draws other negatives and ties
        assert sharded_info["scorer_train_accuracy"] == info["scorer_train_accuracy"]
        other, _ = _sharded(corpus, tmp_path / "other", method, block, tasks, seed=SEED + 1)
        assert other != got


def test_sharded_kmeans_keeps_exactly_the_in_memory_clusters_and_selection(corpus, tmp_path_factory, tmp_path,
                                                                          monkeypatch):
    """``diversity_kmeans``: the embeddings over the in-memory batches (straddling files), the k-means fitted on them
    as one memory map -- here in mini-batches, as beyond 20k documents (the threshold lowered to this pool) -- and
    the ``cluster_balanced`` selector."""
    from effitrain.selection.scorers import lm

    monkeypatch.setattr(lm, "MINIBATCH_ABOVE", 100)
    block = _block("diversity_kmeans", {"scorer": {"proxy_steps": 20, "batch_size": 7, "num_clusters": 5},
                                        "budget": {"fraction": 0.3, "unit": "tokens"}})
    expected, info = _in_memory(corpus, tmp_path_factory.mktemp("memory"), block, "diversity_kmeans")
    got, sharded_info = _sharded(corpus, tmp_path, "diversity_kmeans", block, 3)
    assert got == expected and 0 < len(got) < 0.5 * info["pool_examples"]
    assert sharded_info["scorer_clusters"] == info["scorer_clusters"] == 5


# --------------------------------------------------------------------------------------------------------- dedup
@pytest.fixture(scope="module")
def corpus_with_duplicates(tmp_path_factory) -> Path:
    """Five files and, sorted between the third and the fourth, copies of documents of the others: verbatim,
    upper-cased (an exact duplicate after normalization) and with one word changed (a near duplicate)."""
    folder = _corpus(tmp_path_factory.mktemp("dedup") / "corpus", docs=300, files=5)
    records = {f: [json.loads(line) for line in (folder / f"part-{f:05d}.jsonl").read_text().splitlines()]
               for f in range(5)}
    copies = []
    for i, f in enumerate((0, 3, 4, 3, 1, 4)):
        for r in records[f][i * 5:i * 5 + 4]:
            words = r["text"].split()
            if len(copies) % 3 == 1:
                words = [w.upper() for w in words]
            elif len(copies) % 3 == 2:
                words[len(words) // 2] = "zzyzx"
            copies.append({"id": f"copy-of-{r['id']}", "text": " ".join(words), "domain": r["domain"]})
    (folder / "part-00002b.jsonl").write_text("".join(json.dumps(c) + "\n" for c in copies))
    return folder


@pytest.mark.parametrize("scorer, tasks", [({}, 1), ({"exact": False, "shingle": "char", "shingle_size": 4,
                                                "threshold": 0.5, "num_perm": 64}, 3)])
def test_sharded_dedup_keeps_exactly_the_in_memory_representatives(corpus_with_duplicates, tmp_path_factory,
                                                                   tmp_path, scorer, tasks):
    block = _block("dedup", {"scorer": scorer, "budget": {"fraction": 1.0, "unit": "tokens"}})
    expected, info = _in_memory(corpus_with_duplicates, tmp_path_factory.mktemp("memory"), block,
                                f"dedup{json.dumps(scorer)}")
    got, sharded_info = _sharded(corpus_with_duplicates, tmp_path, "dedup", block, tasks)
    assert got == expected
    for key in ("pool_examples", "scorer_exact_duplicates", "scorer_near_duplicates"):
        assert sharded_info[key] == info[key], key
    assert info["scorer_near_duplicates"] > 0 and (info["scorer_exact_duplicates"] > 0 or "exact" in scorer)
    if not scorer:
        # the first in pool order is kept: a copy in part-00002b wins over its original in part-00003/4 and loses to
        # its original in part-00000/1
        file_of = {json.loads(line)["id"]: f for f in range(5)
                   for line in (corpus_with_duplicates / f"part-{f:05d}.jsonl").read_text().splitlines()}
        kept = set(expected)
        pairs = [(f"copy-of-{i}", i, file_of[i]) for i in file_of]
        assert any(c in kept and o not in kept for c, o, f in pairs if f >= 3)
        assert any(o in kept and c not in kept for c, o, f in pairs if f <= 1)


# ----------------------------------------------------------------------------------- map tasks in bounded memory
@pytest.mark.parametrize("method", ["quality_classifier", "dedup"])
def test_map_tasks_cutting_each_file_into_blocks_select_the_same(method, corpus, corpus_with_duplicates,
                                                                 tmp_path_factory, tmp_path, monkeypatch):
    """The pool, signature and score tasks stream a file a block of documents at a time (1024; here 5, so each
    file is many blocks and its last one short, the signatures appended block by block): the same selection."""
    from effitrain.selection import sharded_pool

    monkeypatch.setattr(sharded_pool, "BLOCK", 5)
    if method == "dedup":
        block, data, key = _block("dedup", {"budget": {"fraction": 1.0, "unit": "tokens"}}), corpus_with_duplicates, \
            "dedup{}"
    else:
        block, data, key = _block(method, CASES[method]), corpus, method
    expected, info = _in_memory(data, tmp_path_factory.mktemp("memory"), block, key)
    got, sharded_info = _sharded(data, tmp_path, method, block, 2)
    assert got == expected and sharded_info["pool_examples"] == info["pool_examples"]


class _Live:
    """Documents that count how many of them are alive at once (a step that keeps a file's documents keeps them
    all alive)."""

    def __init__(self) -> None:
        self.alive = self.most = 0

    def documents(self, texts: list, file_index: int = 0):
        import weakref

        from datatrove.data import Document

        class Counted(Document):  # datatrove's Document has slots: a subclass can be referenced weakly
            pass

        for record, text in enumerate(texts):
            doc = Counted(text=text, id=f"{file_index}/{record}",
                           metadata={"file": file_index, "record": record, "domain": "ab"[record % 2],
                                     "source_id": None})
            self.alive += 1
            self.most = max(self.most, self.alive)
            weakref.finalize(doc, self._gone)
            yield doc

    def _gone(self) -> None:
        self.alive -= 1


def test_pool_and_score_tasks_hold_a_block_of_documents_not_a_file(tmp_path, monkeypatch):
    import pickle

    from effitrain.selection import sharded_pool
    from effitrain.selection.scorers.zip_fit import _clen
    from effitrain.selection.sharded_pool import PoolCounts
    from effitrain.selection.sharded_scored import ScoreKeys

    monkeypatch.setattr(sharded_pool, "BLOCK", 5)
    texts = [f"document {i} says " + "something new " * (i % 7 + 1) for i in range(60)]
    np.save(tmp_path / "eval.npy", np.array([[0, 3]], dtype=np.int64))
    live = _Live()
    dedup = {"num_perm": 16, "shingle": "word", "shingle_size": 2, "near": True}
    PoolCounts(str(tmp_path / "work"), eval_docs=str(tmp_path / "eval.npy"), dedup=dedup).run(live.documents(texts))
    assert 0 < live.most <= 2 * 5 + 2, live.most  # this block and the next being filled; 60 if the file were held
    with np.load(tmp_path / "work" / "pool" / "000000.npz") as z:
        assert z["record"].tolist() == [r for r in range(60) if r != 3]
        assert z["domains"].tolist() == ["a", "b"] and z["domain"].tolist() == [r % 2 for r in range(60) if r != 3]
    sig = np.load(tmp_path / "work" / "sig" / "000000.npy")
    assert sig.shape == (59, 16) and sig.dtype == np.uint32  # datasketch's 32-bit values, published narrow

    target = [b"something new something new"]
    (tmp_path / "fitted.pkl").write_bytes(pickle.dumps({"scorer": "zip_fit", "zip_fit": {
        "targets": target, "target_lens": [_clen(t, 9) for t in target], "max_chars": 2000, "level": 9}}))
    (tmp_path / "plan.json").write_text(json.dumps({
        "files": {"0": {"offset": 0, "skip": [7]}}, "n_files": 1, "seed": 3, "unit": "tokens", "selector": "topk",
        "descending": True, "eval_docs": str(tmp_path / "eval.npy")}))
    live = _Live()
    ScoreKeys(str(tmp_path / "work"), plan=str(tmp_path / "plan.json"), fitted=str(tmp_path / "fitted.pkl"),
              reader=None).run(live.documents(texts))
    assert 0 < live.most <= 2 * 5 + 2, live.most
    keys = sharded_pool.load_arrays(tmp_path / "work" / "keys" / "00000")
    assert sorted(keys["record"].tolist()) == [r for r in range(60) if r not in (3, 7)]


def test_rows_appended_a_block_at_a_time_publish_the_array_and_narrow_only_when_every_value_fits(tmp_path):
    from effitrain.selection.sharded_pool import RowsFile

    rows = np.arange(30, dtype=np.uint64).reshape(10, 3) * np.uint64(1 << 20)
    wide = rows.copy()
    wide[7, 1] = np.uint64(1 << 40)  # one value past 32 bits, in the last block
    for name, values, dtype in (("narrow", rows, np.uint32), ("wide", wide, np.uint64)):
        out = RowsFile(tmp_path / f"{name}.npy", np.uint64, width=3, narrow=np.uint32)
        for i in range(0, 10, 4):
            out.append(values[i:i + 4])
        out.publish()
        got = np.load(tmp_path / f"{name}.npy")
        assert got.dtype == dtype and got.shape == (10, 3) and (got.astype(np.uint64) == values).all()
    RowsFile(tmp_path / "empty.npy", np.uint64, width=3, narrow=np.uint32).publish()
    assert np.load(tmp_path / "empty.npy").shape == (0, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npy", "narrow.npy", "wide.npy"]  # no temporaries


@pytest.mark.parametrize("collide", [False, True])
def test_dedup_bucket_numbers_are_exact_also_when_the_mix_collides(collide, monkeypatch):
    """Rows share a bucket number exactly when all their values are equal -- with the 64-bit mix, and when every
    row's mix is the same (then the rows themselves are numbered)."""
    from effitrain.selection import sharded_dedup

    if collide:
        monkeypatch.setattr(sharded_dedup, "_mix", lambda values: np.zeros(len(values), dtype=np.uint64))
    values = np.random.default_rng(0).integers(0, 3, size=(500, 2)).astype(np.uint32)  # 9 distinct rows
    ids, counts = sharded_dedup.bucket_numbers(values)
    _, expected = np.unique(values.view(np.dtype((np.void, 8))).reshape(-1), return_inverse=True)
    joint = np.unique(np.stack([ids, expected.reshape(-1)], axis=1), axis=0)
    assert len(joint) == len(np.unique(ids)) == 9 and len(counts) == 9 and counts[ids].tolist() == \
        np.bincount(expected.reshape(-1))[expected.reshape(-1)].tolist()


# -------------------------------------------------------------------------------------------- SIGKILL, relaunch
_SELECT = textwrap.dedent("""
    import sys
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.registry import REGISTRY
    from effitrain.selection.sharded import sharded_selection
    load_builtin_blocks()
    dataset = LocalParams(path=[sys.argv[1]], domain_field="domain", eval_examples_per_domain=4, seq_len=64)
    block = REGISTRY.parse("selection", {"name": "zip_fit", "target": {"domain": "science", "max_examples": 10},
                                         "scorer": {"max_target": 4}}, "selection")
    hook = sharded_selection("zip_fit", block.params, seed=3)
    build_sharded_splits(dataset, LlamaParams(vocab_size=512), EngineSettings("local", tasks=4, workers=1),
                         cache_dir=sys.argv[2], selection=hook)
    print("selection:", hook.info["manifest"])
""")


def _score_stage(cache: Path) -> Path | None:
    for stage in (cache / "data_engine").glob("*/score_stage"):
        return stage
    return None


def test_a_launch_killed_mid_score_reruns_only_the_unfinished_tasks_and_selects_the_same(tmp_path):
    corpus = _corpus(tmp_path / "corpus", docs=800, files=8)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _SELECT, str(corpus), str(cache)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # kill once a score task of the 4 has marked itself done
        stage = _score_stage(cache)
        if stage is not None and any((stage / "logs" / "completions").glob("*")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the selection finished before it could be killed"
    stage = _score_stage(cache)
    done = sorted(int(p.name) for p in (stage / "logs" / "completions").glob("*"))
    missing = [r for r in range(4) if r not in done]
    assert done and missing

    relaunch = subprocess.run([sys.executable, "-c", _SELECT, str(corpus), str(cache)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert "zip_fit-pool" not in relaunch.stdout  # the finished pool stage is not run again
    ran = ", ".join(map(str, missing))
    assert (f"data: zip_fit-score: {len(missing)} of 4 tasks to run ({len(done)} done by an earlier launch; running "
            f"task{'s' if len(missing) > 1 else ''} {ran}) on local") in relaunch.stdout, relaunch.stdout
    clean = subprocess.run([sys.executable, "-c", _SELECT, str(corpus), str(tmp_path / "clean")], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    relaunched = Path(relaunch.stdout.split("selection: ")[1].split()[0]) / "selected.npy"
    uninterrupted = Path(clean.stdout.split("selection: ")[1].split()[0]) / "selected.npy"
    assert relaunched.read_bytes() == uninterrupted.read_bytes() and len(np.load(uninterrupted)) > 0


# --------------------------------------------------------------------------------------------------------- check
def _corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 40, "domain": "a" if i % 2 else "b"}) + "\n"
                            for i in range(50)))
    return path


@pytest.mark.parametrize("method", ["less", "s2l"])
def test_check_keeps_less_and_s2l_on_one_node(method, tmp_path, capsys):
    code, err = _check(["dataset=local", f"dataset.path={_corpus_file(tmp_path)}", "dataset.domain_field=domain",
                        "data.executor=local", f"selection={method}", "selection.target.domain=a"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("effitrain: error: "), err
    assert f"selection={method} stays on one node" in lines[0]
    assert "use selection=none, dsir, dedup, quality_classifier, perplexity, zip_fit, random, diversity_kmeans" \
        in lines[0]


@pytest.mark.parametrize("args", [["+recipe=quality_classifier", "selection.target.domain=a"],
                                  ["+recipe=perplexity_filter", "selection.target.domain=a"], ["+recipe=dedup"],
                                  ["selection=diversity_kmeans", "selection.target.domain=a"]])
def test_check_accepts_the_sharded_selections(args, tmp_path, capsys):
    code, err = _check(["dataset=local", f"dataset.path={_corpus_file(tmp_path)}", "dataset.domain_field=domain",
                        "dataset.eval_examples_per_domain=4", "data.executor=local", "data.tasks=2", *args], capsys)
    assert code == 0, err
