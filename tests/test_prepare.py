"""``effitrain prepare``, the data-only launch (issue 24): it builds a run's data -- the sharded scan, selection,
tokenize and pack into token shards, or the in-memory pool, selection and packed rows -- and stops before the
model; the training run with the same overrides then starts from that cache, running no data stage again.  Bad
input is one line, exit 2, and nothing is built."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, effitrain_cli

sys.path.insert(0, str(REPO / "scripts"))
import make_corpus  # noqa: E402  (scripts/ is not a package)

RUN = [*(o for o in TINY if not o.startswith("dataset.max_docs")), "dataset.domain_field=domain",
       "train.max_steps=2", "train.micro_batch_size=2", "train.save_final_model=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepare") / "corpus"
    make_corpus.generate(folder, docs=400, files=4, fmt="jsonl", seed=0, ids=True,
                         domains=make_corpus.DOMAINS[:3])
    return folder


def test_prepare_builds_the_selection_and_shards_and_the_run_trains_from_them(tmp_path, corpus):
    """From the console script on an empty cache: prepare runs the data stages (scan, dsir, tokenize, pack) and
    names the shards; training with the same overrides runs none of them and trains on those very shards."""
    env = {"EFFITRAIN_CACHE": str(tmp_path / "cache")}
    data = ["+recipe=dsir", "dataset=local", f"dataset.path={corpus}", "selection.target.domain=science",
            "selection.target.max_examples=8", "data.executor=local", "data.tasks=2", *RUN]
    prepared = effitrain_cli("prepare", "--json", *data, env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    for stage in ("scan", "dsir-count", "dsir-keys", "tokenize", "pack"):
        assert f"data: {stage}: " in prepared.stdout, (stage, prepared.stdout)
    out = json.loads(prepared.stdout[prepared.stdout.index("{"):])
    shards = Path(out["token_shards"])
    assert out["selection"] == "dsir" and 0 < out["kept_examples"] < 400
    assert out["rows"] == json.loads((shards / "index.json").read_text())["rows"] > 0
    assert not (tmp_path / "run").exists()  # no run directory: nothing was trained

    trained = effitrain_cli(*data, f"run_dir={tmp_path / 'run'}", env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "data:" not in trained.stdout  # every data stage came from the cache
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selection"]["token_shards"] == str(shards)
    assert summary["selection"]["kept_examples"] == out["kept_examples"]
    assert summary["train_sequences"] == out["rows"]


def test_prepare_on_the_in_memory_path_packs_what_the_run_then_reuses(tmp_path):
    """Without data.executor: the built-in corpus's pool and packed rows, reported in one line."""
    env = {"EFFITRAIN_CACHE": str(tmp_path / "cache")}
    prepared = effitrain_cli("prepare", *TINY, env=env, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert prepared.stdout.startswith("ok: data prepared in ")
    assert "train rows of" in prepared.stdout and "the datasets cache" in prepared.stdout
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("args, expected", [
    (["dataset=local", "dataset.path=/no/such/folder", "data.executor=local"], "dataset.path"),
    (["--frobnicate"], "prepare: unknown option '--frobnicate'"),
    (["data.executor=lokal"], "data.executor"),
    (["+recipe=anneal_law"], "prepare: this config is a pipeline of"),
])
def test_bad_input_is_one_line_and_builds_nothing(tmp_path, args, expected):
    env = {"EFFITRAIN_CACHE": str(tmp_path / "cache")}
    result = effitrain_cli("prepare", *args, env=env, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))
