"""Bad or hostile input: one readable line naming the key/file and what would be valid, exit status 2, no traceback,
and nothing that existed before (data files, run directories, caches) changed.  Caches are content-checked.

Most cases run ``effitrain check`` in this process (``effitrain.cli.main``: no interpreter start, no DeepSpeed);
a few run the real command in a subprocess, where only that proves the point (exit status, a package copy with a
broken recipe, two concurrent ``select --force``).  The two that need a training launch are marked ``slow``.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, effitrain_cli
from effitrain.cli import main as cli_main
from effitrain.registry import ConfigError


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict:
    """Every file under ``roots`` with its bytes and mtime, and every folder (a deleted or added one shows)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            out[str(p)] = (p.read_bytes(), st.st_mtime_ns) if p.is_file() else ("dir", None)
    return out


def run_check(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, *expected: str) -> str:
    assert code == 2, f"exit {code}; stdout: {out!r} stderr: {err!r}"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("effitrain: error: "), err
    assert "Traceback" not in err + out
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def docs(n: int, **extra) -> list[dict]:
    return [{"text": f"document number {i} with a few words", **extra} for i in range(n)]


# ------------------------------------------------------------------------------------------------ bad data
def _data_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (overrides after dataset=local, fragments the one error line must contain)."""
    d = tmp / "data"
    d.mkdir()
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.jsonl").write_text("\n\n   \n\t\n")
    (d / "blank.txt").write_text("\n\n\n")
    (d / "folder.jsonl").mkdir()
    (d / "latin1.txt").write_bytes("first paragraph\n\ncaf\u00e9 au lait\n".encode("latin-1"))
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    jsonl(d / "malformed.jsonl", docs(2) + ['{"text": "unterminated'])
    jsonl(d / "array_line.jsonl", docs(1) + ['["text", "a list"]'])
    jsonl(d / "some_missing.jsonl", docs(5) + [{"body": "no text key"}, {"body": "again"}])
    jsonl(d / "all_missing.jsonl", [{"body": f"doc {i}"} for i in range(5)])
    jsonl(d / "null_text.jsonl", docs(3) + [{"text": None}])
    jsonl(d / "int_text.jsonl", [{"text": i} for i in range(5)])
    jsonl(d / "mixed_text.jsonl", docs(3) + [{"text": ["a", "list"]}])
    jsonl(d / "empty_text.jsonl", [{"text": ""}, {"text": "   "}])
    (d / "fake.parquet").write_text("this is not parquet\n")
    jsonl(d / "few.jsonl", docs(5))
    jsonl(d / "domains.jsonl", [{"text": f"doc {i}", "src": "a" if i % 2 else "b"} for i in range(40)])
    jsonl(d / "some_no_domain.jsonl", [{"text": f"doc {i}", "src": "a"} for i in range(5)] + [{"text": "x"}])
    (d / "table.csv").write_text("text\nhello\n")
    jsonl(d / "ok.jsonl", docs(40))
    (d / "ok.txt").write_text("".join(f"paragraph {i}\n\n" for i in range(40)))
    (d / "array.json").write_text('[{"text": "a"}, {"text": "b"},\n {"text": ]')
    with bz2.open(d / "latin1.jsonl.bz2", "wb") as fh:
        fh.write(b'{"text": "caf\xe9"}\n')
    return {
        "empty_file": ([f"dataset.path={d}/empty.jsonl"], ["dataset.path", "empty.jsonl", "is empty"]),
        "blank_lines_jsonl": ([f"dataset.path={d}/blank.jsonl"], ["dataset.path", "blank.jsonl", "no records"]),
        "blank_lines_txt": ([f"dataset.path={d}/blank.txt"], ["dataset.path", "blank.txt", "no records"]),
        "directory": ([f"dataset.path={d}/folder.jsonl"], ["dataset.path", "is a directory", "folder.jsonl/*.jsonl"]),
        "missing_file": ([f"dataset.path={d}/nothere.jsonl"], ["dataset.path", "nothere.jsonl", "does not exist"]),
        "glob_matches_nothing": ([f"dataset.path={d}/*.nope.jsonl"], ["dataset.path", "no file matches"]),
        "non_utf8_txt": ([f"dataset.path={d}/latin1.txt"], ["latin1.txt", "line 3", "not UTF-8", "0xe9"]),
        "non_utf8_jsonl": ([f"dataset.path={d}/latin1.jsonl"], ["latin1.jsonl", "line 2", "not UTF-8"]),
        "non_utf8_compressed": ([f"dataset.path={d}/latin1.jsonl.bz2"], ["latin1.jsonl.bz2", "line 1", "not UTF-8"]),
        "malformed_jsonl": ([f"dataset.path={d}/malformed.jsonl"], ["malformed.jsonl", "line 3", "not valid JSON"]),
        "malformed_json_array": ([f"dataset.path={d}/array.json"], ["array.json", "not valid JSON", "line 2"]),
        "json_line_not_object": ([f"dataset.path={d}/array_line.jsonl"], ["line 2", "is a JSON list, not an object"]),
        "rows_missing_text": ([f"dataset.path={d}/some_missing.jsonl"],
                              ["dataset.text_field", "2 of 7 rows have no 'text'", "line 6"]),
        "no_row_has_text": ([f"dataset.path={d}/all_missing.jsonl"],
                            ["dataset.text_field", "column 'text' not found", "columns: body"]),
        "null_text": ([f"dataset.path={d}/null_text.jsonl"], ["dataset.text_field", "1 of 4 rows", "line 4"]),
        "int_text": ([f"dataset.path={d}/int_text.jsonl"], ["dataset.text_field", "line 1", "holds int", "not a string"]),
        "mixed_text_types": ([f"dataset.path={d}/mixed_text.jsonl"], ["line 4", "holds list", "not a string"]),
        "only_empty_text": ([f"dataset.path={d}/empty_text.jsonl"], ["dataset.path", "no documents with text"]),
        "parquet_not_parquet": ([f"dataset.path={d}/fake.parquet"], ["fake.parquet", "not a parquet file"]),
        "too_few_for_holdout": ([f"dataset.path={d}/few.jsonl", "dataset.eval_examples_per_domain=8"],
                                ["dataset.eval_examples_per_domain", "only 5 documents", "hold out 8", "below 5"]),
        "too_few_in_one_domain": ([f"dataset.path={d}/domains.jsonl", "dataset.domain_field=src",
                                   "dataset.eval_examples_per_domain=20"], ["domain 'a' has only 20 documents"]),
        "unknown_domain": ([f"dataset.path={d}/domains.jsonl", "dataset.domain_field=src", "dataset.domains=[a,c]",
                            "dataset.eval_examples_per_domain=2"], ["dataset.domains", "unknown domain 'c'", "valid: a, b"]),
        "unknown_domain_field": ([f"dataset.path={d}/ok.jsonl", "dataset.domain_field=source"],
                                 ["dataset.domain_field", "column 'source' not found"]),
        "rows_missing_domain": ([f"dataset.path={d}/some_no_domain.jsonl", "dataset.domain_field=src",
                                 "dataset.eval_examples_per_domain=1"], ["dataset.domain_field", "1 of 6 rows", "line 6"]),
        "unknown_extension": ([f"dataset.path={d}/table.csv"], ["dataset.path", "cannot tell the format", ".jsonl"]),
        "mixed_formats": ([f"dataset.path=[{d}/ok.jsonl,{d}/ok.txt]"], ["dataset.path", "mixes formats"]),
        "no_path": ([], ["dataset.path", "required"]),
        "empty_path_list": (["dataset.path=[]"], ["dataset.path", "needs files"]),
        "empty_eval_file": ([f"dataset.path={d}/ok.jsonl", f"dataset.eval_path={d}/empty.jsonl"],
                            ["dataset.eval_path", "empty.jsonl", "is empty"]),
        "not_a_regular_file": (["dataset.path=/dev/null"], ["dataset.path", "not a regular file"]),
        "too_little_text_for_one_batch": ([f"dataset.path={d}/few.jsonl", "dataset.eval_examples_per_domain=1"],
                                          ["at most 1 packed sequences of 128 tokens", "global batch of 8"]),
        "missing_eval_file": ([f"dataset.path={d}/ok.jsonl", f"dataset.eval_path={d}/gone.jsonl"],
                              ["dataset.eval_path", "does not exist"]),
    }


DATA_CASES = [
    "empty_file", "blank_lines_jsonl", "blank_lines_txt", "directory", "missing_file", "glob_matches_nothing",
    "non_utf8_txt", "non_utf8_jsonl", "non_utf8_compressed", "malformed_jsonl", "malformed_json_array",
    "json_line_not_object", "rows_missing_text", "no_row_has_text", "null_text", "int_text", "mixed_text_types",
    "only_empty_text", "parquet_not_parquet", "too_few_for_holdout", "too_few_in_one_domain", "unknown_domain",
    "unknown_domain_field", "rows_missing_domain", "unknown_extension", "mixed_formats", "no_path",
    "empty_path_list", "empty_eval_file", "missing_eval_file", "not_a_regular_file", "too_little_text_for_one_batch",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baddata")
    return tmp, _data_cases(tmp)


@pytest.fixture
def private_cache(tmp_path, monkeypatch, isolated_cache):
    """A cache folder of this test's own: the session's cache is shared with the other pytest-xdist workers, which
    may be building an entry (the demo corpus, a tokenizer) while this test checks that `check` wrote nothing."""
    cache = tmp_path / "effitrain-cache"
    cache.mkdir()
    monkeypatch.setenv("EFFITRAIN_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_local_data_is_one_line_at_check(case, data_dir, capsys, private_cache):
    tmp, cases = data_dir
    overrides, expected = cases[case]
    before = snapshot(tmp, private_cache)
    code, out, err = run_check(["dataset=local", *overrides], capsys)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(tmp, private_cache) == before


def test_data_case_list_is_complete(data_dir):
    assert sorted(data_dir[1]) == sorted(DATA_CASES)


def test_good_local_data_passes_check(data_dir, capsys):
    tmp, _ = data_dir
    (tmp / "data" / "bom.jsonl").write_bytes(b'\xef\xbb\xbf' + b"".join(b'{"text": "doc %d"}\r\n' % i for i in range(9)))
    for path in ("ok.jsonl", "ok.txt", "bom.jsonl"):
        code, out, err = run_check(["dataset=local", f"dataset.path={tmp}/data/{path}", "dataset.seq_len=16",
                                    "train.micro_batch_size=2", "dataset.eval_examples_per_domain=4"], capsys)
        assert code == 0 and out.startswith("ok:"), err


def test_real_parquet_with_wrong_text_type(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "body.parquet")
    code, out, err = run_check(["dataset=local", f"dataset.path={tmp_path}/ints.parquet"], capsys)
    assert_one_line_error(code, out, err, "dataset.text_field", "ints.parquet", "not strings")
    code, out, err = run_check(["dataset=local", f"dataset.path={tmp_path}/body.parquet"], capsys)
    assert_one_line_error(code, out, err, "column 'text' not found", "columns: body")


def test_bad_data_found_at_launch_is_one_line_too(data_dir, monkeypatch):
    """The builder itself (what a launch runs) refuses the same files with the same kind of line."""
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.data.build import build_local

    tmp, _ = data_dir
    for name, expected in (("malformed.jsonl", "line 3 is not valid JSON"), ("some_missing.jsonl", "2 of 7 rows"),
                           ("latin1.txt", "not UTF-8"), ("blank.jsonl", "no records")):
        with pytest.raises(ConfigError, match=expected):
            build_local(LocalParams(path=[f"{tmp}/data/{name}"], eval_examples_per_domain=1),
                        cache_dir=tmp / "hf-cache")
    # a big file (over the read-through size) that `datasets` refuses is explained the same way
    from effitrain.data import inspect

    monkeypatch.setattr(inspect, "SMALL_BYTES", 0)
    with pytest.raises(ConfigError, match="line 3 is not valid JSON"):
        build_local(LocalParams(path=[f"{tmp}/data/malformed.jsonl"], eval_examples_per_domain=1),
                    cache_dir=tmp / "hf-cache")


def test_bad_data_refused_before_hydra_or_deepspeed(data_dir, tmp_path):
    """A real training launch on a malformed file: exit 2, one line, no run directory, in about a second."""
    tmp, _ = data_dir
    run_dir = tmp_path / "run"
    result = effitrain_cli("dataset=local", f"dataset.path={tmp}/data/malformed.jsonl",
                           "dataset.eval_examples_per_domain=1", f"run_dir={run_dir}", timeout=120)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, "malformed.jsonl", "line 3")
    assert not run_dir.exists()
    assert "deepspeed" not in (result.stdout + result.stderr).lower()


# ------------------------------------------------------------------------------------------------ config truthfulness
def _model_folders(tmp: Path) -> dict[str, Path]:
    no_config = tmp / "no_config"
    no_config.mkdir()
    (no_config / "tokenizer.json").write_text("{}")
    short = tmp / "short_positions"
    short.mkdir()
    (short / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (short / "tokenizer.json").write_text("{}")
    no_tok = tmp / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096}))
    bad_json = tmp / "bad_config"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (tmp / "a_file").write_text("x")
    no_type = tmp / "no_model_type"
    no_type.mkdir()
    (no_type / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (no_type / "tokenizer.json").write_text("{}")
    architectures_only = tmp / "architectures_only"  # a hand-edited or converted config: AutoConfig still fails
    architectures_only.mkdir()
    (architectures_only / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (architectures_only / "tokenizer.json").write_text("{}")
    jsonl(tmp / "bad_target.jsonl", [{"text": "fine"}, '{"text": oops}'])
    return {"no_config": no_config, "short": short, "no_tok": no_tok, "bad_json": bad_json, "file": tmp / "a_file",
            "no_type": no_type, "architectures_only": architectures_only}


CONFIG_CASES = {
    "lr_inf": (["optimizer.lr=inf"], ["optimizer.lr", "finite number", "inf"]),
    "lr_nan": (["optimizer.lr=nan"], ["optimizer.lr", "finite number", "nan"]),
    "clip_minus_inf": (["train.clip_grad_norm=-inf"], ["train.clip_grad_norm", "finite number"]),
    "weight_decay_inf": (["optimizer.weight_decay=inf"], ["optimizer.weight_decay", "finite"]),
    "seq_len_over_llama_positions": (["dataset.seq_len=4096", "model.max_position_embeddings=2048"],
                                     ["dataset.seq_len=4096", "max_position_embeddings (2048)"]),
    "seq_len_plus_prefix_over_positions": (["peft=prefix", "dataset.seq_len=2040"],
                                           ["peft.num_virtual_tokens=10", "at most 2038"]),
    "seq_len_over_pretrained_positions": (["model=pretrained", "model.path={short}"],
                                          ["dataset.seq_len=128", "config.json (64)", "at most 64"]),
    "pretrained_missing": (["model=pretrained", "model.path={tmp}/nope"], ["model.path", "does not exist"]),
    "pretrained_no_config": (["model=pretrained", "model.path={no_config}"], ["model.path", "no config.json"]),
    "pretrained_architectures_without_model_type": (["model=pretrained", "model.path={architectures_only}"],
                                                    ["model.path", "no model_type", "LlamaForCausalLM",
                                                     "add \"model_type\""]),
    "pretrained_bad_config_json": (["model=pretrained", "model.path={bad_json}"], ["config.json", "not valid JSON"]),
    "pretrained_no_model_type": (["model=pretrained", "model.path={no_type}"], ["model.path", "no model_type"]),
    "selection_target_malformed": (["selection=dsir", "selection.target.domain=null",
                                    "selection.target.path=[{tmp}/bad_target.jsonl]"],
                                   ["selection.target.path", "bad_target.jsonl", "line 2", "not valid JSON"]),
    "pretrained_no_tokenizer": (["model=pretrained", "model.path={no_tok}"], ["model.path", "no tokenizer files"]),
    "pretrained_is_a_file": (["model=pretrained", "model.path={file}"], ["model.path", "is a file"]),
    "pretrained_path_unset": (["model=pretrained"], ["model.path", "required"]),
    "hub_model_offline": (["model=pretrained", "model.path=nobody/no-such-model"],
                          ["model.path", "not in the Hugging Face cache", "downloads are off"]),
    "tokenizer_path_missing": (["model.tokenizer={tmp}/no_tok_here"], ["model.tokenizer", "does not exist"]),
    "hub_dataset_offline": (["dataset=hub", "dataset.path=nobody/no-such-dataset"],
                            ["dataset.path", "not in the local Hugging Face cache", "dataset=local"]),
    "unknown_top_level_key": (["foo=1"], ["foo: unknown key", "valid keys: curriculum, data, dataset"]),
    "unknown_top_level_key_added": (["+foo=1"], ["foo: unknown key", "valid: curriculum, data, dataset"]),
    "train_not_a_mapping": (["train=1"], ["train: expected a mapping"]),
    "methods_a_list": (["methods=[]"], ["methods: expected a mapping of keys, got a list", "methods=[]"]),
    "tokenizer_empty": (["model.tokenizer=''"], ["model.tokenizer: empty"]),
    "method_not_a_mapping": (["+methods.lisa=3"], ["methods.lisa: expected a mapping"]),
    "plugin_missing": (["plugins=[no_such_plugin_mod]"], ["plugins", "cannot import 'no_such_plugin_mod'"]),
    "plugin_raises": (["plugins=[rin_bad_plugin]"], ["plugins", "rin_bad_plugin", "RuntimeError", "boom"]),
    "plugin_syntax_error": (["plugins=[rin_syntax_plugin]"], ["plugins", "syntax error", "line 1"]),
    "selection_target_missing": (["selection=dsir", "selection.target.domain=null",
                                  "selection.target.path=[{tmp}/no_target.jsonl]"],
                                 ["selection.target.path", "does not exist"]),
    "schema_key_the_yaml_leaves_out": (["selection=random", "selection.domains=[prose]"],
                                       ["selection.domains", "'+selection.domains=VALUE'"]),
    "selection_domain_not_in_the_demo_corpus": (["selection=random", "+selection.domains=[nope]"],
                                                ["selection.domains", "domain 'nope' is not in the training data",
                                                 "arithmetic, code, docstrings, prose"]),
    "demo_unknown_domain": (["dataset.domains=[prose,nope]"], ["dataset.domains", "unknown domain 'nope'",
                                                               "valid: arithmetic, code"]),
    "selection_reference_model_missing": (["selection=perplexity", "selection.scorer.model_path={tmp}/no_ref"],
                                          ["selection.scorer.model_path", "does not exist"]),
    "cache_root_is_a_file": (["CACHE={file}/sub"], ["EFFITRAIN_CACHE", "is a file"]),
    "wandb_online_without_credentials": (["logger=wandb", "logger.mode=online"],
                                         ["logger.mode", "WANDB_API_KEY", "logger.mode=offline"]),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    folders = _model_folders(tmp)
    plugins = tmp / "plugins"
    plugins.mkdir()
    (plugins / "rin_bad_plugin.py").write_text("raise RuntimeError('boom')\n")
    (plugins / "rin_syntax_plugin.py").write_text("def (:\n")
    return tmp, folders, plugins


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_untruthful_config_is_one_line_at_check(case, model_dirs, capsys, monkeypatch, tmp_path, private_cache):
    tmp, folders, plugins = model_dirs
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    overrides, expected = CONFIG_CASES[case]
    overrides = [o.format(tmp=tmp, **folders) for o in overrides]
    for o in [o for o in overrides if o.startswith("CACHE=")]:
        monkeypatch.setenv("EFFITRAIN_CACHE", o.split("=", 1)[1])
        overrides.remove(o)
    before = snapshot(tmp, private_cache)
    code, out, err = run_check(overrides, capsys)
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(tmp, private_cache) == before


def test_check_accepts_a_good_pretrained_folder_and_wandb_with_a_key(model_dirs, capsys, monkeypatch):
    tmp, folders, _ = model_dirs
    code, out, err = run_check(["model=pretrained", f"model.path={folders['short']}", "dataset.seq_len=64"], capsys)
    assert code == 0, err
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    code, out, err = run_check(["logger=wandb", "logger.mode=online"], capsys)
    assert code == 0, err


def test_tensorboard_path_that_is_a_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("not a folder")
    before = snapshot(tmp_path)
    code, out, err = run_check(["logger=tensorboard", f"run_dir={run_dir}", "resume=auto"], capsys)
    assert_one_line_error(code, out, err, "tensorboard", "is a file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("logger, blocker, expected", [
    ("tensorboard", "tensorboard", "cannot start tensorboard"),
    ("console", "metrics.jsonl", "metrics.jsonl"),
])
def test_logger_construction_failure_is_a_config_error(tmp_path, logger, blocker, expected):
    """What the run does when a sink cannot start (after check, e.g. the path appeared since): one ConfigError."""
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate

    spec = validate(compose_config([f"logger={logger}"]).cfg)
    if blocker == "metrics.jsonl":
        (tmp_path / blocker).mkdir()
    else:
        (tmp_path / blocker).write_text("in the way")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=expected):
        spec.block("logger").build(run_dir=tmp_path, max_steps=1, start_step=0, config={})
    after = snapshot(tmp_path)
    after.pop(str(tmp_path / "metrics.jsonl"), None)  # the jsonl sink (made first) may have been opened
    before.pop(str(tmp_path / "metrics.jsonl"), None)
    assert after == before


def test_wandb_that_cannot_log_in_is_a_config_error(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate

    monkeypatch.setenv("WANDB_API_KEY", "short")  # refused by wandb itself before any network call
    spec = validate(compose_config(["logger=wandb", "logger.mode=online"]).cfg)
    with pytest.raises(ConfigError, match=r"cannot start wandb.*logger.mode=offline"):
        spec.block("logger").build(run_dir=tmp_path, max_steps=1, start_step=0, config={})


def test_exit_status_and_no_traceback_from_the_real_command(model_dirs, tmp_path):
    """The same refusals through the installed command: status 2 and one line on stderr."""
    tmp, folders, _ = model_dirs
    for args, expected in ((["check", "optimizer.lr=inf"], "finite number"),
                           (["check", "model=pretrained", f"model.path={folders['no_config']}"], "no config.json"),
                           (["check", "foo=1"], "valid keys: curriculum")):
        result = effitrain_cli(*args, timeout=120)
        assert_one_line_error(result.returncode, result.stdout, result.stderr, expected)
    # `select` reads the cache folder before any data: a file there is one line too
    result = effitrain_cli("select", "selection=random", timeout=120,
                           env={"EFFITRAIN_CACHE": str(folders["file"])})
    assert_one_line_error(result.returncode, result.stdout, result.stderr, "EFFITRAIN_CACHE", "writable folder")


# ------------------------------------------------------------------------------------------------ broken recipe file
@pytest.fixture(scope="module")
def package_with_broken_recipe(tmp_path_factory):
    """A copy of the package with one recipe file that is not valid YAML (the repository is not touched)."""
    root = tmp_path_factory.mktemp("pkg")
    shutil.copytree(REPO / "effitrain", root / "effitrain", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "effitrain" / "configs" / "recipe" / "broken.yaml").write_text(
        "recipe:\n  name: broken\n  paper: [unclosed\noptimizer:\n  lr: 1\n")
    return root


def _cli_in(root: Path, *args: str):
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "effitrain.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=root, env=env)


def test_broken_recipe_is_one_line_naming_file_and_line(package_with_broken_recipe):
    result = _cli_in(package_with_broken_recipe, "check", "+recipe=broken")
    line = assert_one_line_error(result.returncode, result.stdout, result.stderr, "recipe 'broken'", "broken.yaml",
                                 "line ")
    assert "YAML error" in line


def test_broken_recipe_does_not_break_the_recipes_table(package_with_broken_recipe):
    result = _cli_in(package_with_broken_recipe, "recipes")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "BROKEN" in rows["broken"] and "broken.yaml" in rows["broken"]
    assert "wsd" in rows and "BROKEN" not in rows["wsd"]


# ------------------------------------------------------------------------------------------------ caches
def _manifest(tmp: Path, n: int = 50, kept: int = 10):
    from effitrain.selection import manifest as mf

    folder = tmp / "sel" / "random-abc"
    index = np.arange(0, kept * 2, 2)
    header = {"key": "abc", "counts": {"pool_examples": n, "kept_examples": kept}, "info": {}}
    mf.write(folder, header, index, [f"id{i}" for i in index], np.linspace(0, 1, kept))
    return mf, folder


@pytest.mark.parametrize("damage, problem", [
    ("edit_same_lines", "does not match its checksum"),
    ("truncate", "does not match its checksum"),
    ("index_out_of_range", "out of range"),
    ("no_checksum", "no checksum"),
    ("garbage_header", "unreadable"),
])
def test_damaged_manifest_is_not_trusted(tmp_path, caplog, damage, problem):
    mf, folder = _manifest(tmp_path)
    assert mf.load(folder, "abc", 50) is not None
    sel = folder / "selected.jsonl"
    head = folder / "manifest.json"
    if damage == "edit_same_lines":
        sel.write_text(sel.read_text().replace('"index": 2,', '"index": 3,'))
    elif damage == "truncate":
        sel.write_text("".join(sel.read_text().splitlines(keepends=True)[:-1]))
    elif damage == "index_out_of_range":
        # a consistent manifest (checksum recomputed) that points past the candidates
        mf.write(folder, {"key": "abc", "counts": {"pool_examples": 50, "kept_examples": 1}, "info": {}},
                 np.array([70]), ["x"], np.array([1.0]))
    elif damage == "no_checksum":
        data = json.loads(head.read_text())
        data.pop("selected_sha256")
        head.write_text(json.dumps(data))
    else:
        head.write_text("{garbage")
    with caplog.at_level("WARNING", logger="effitrain.selection"):
        assert mf.load(folder, "abc", 50) is None
    assert problem in caplog.text and "scoring again" in caplog.text


def test_edited_manifest_is_rebuilt_by_the_selection_stage(tmp_path, caplog):
    import datasets

    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    rows = [{"id": f"d{i}", "text": f"word {i} " * (i % 7 + 1), "domain": "a" if i % 3 else "b"} for i in range(60)]
    pool = datasets.DatasetDict(train=datasets.Dataset.from_list(rows), eval=datasets.Dataset.from_list(rows[:4]))
    block = REGISTRY.parse("selection", {"name": "random", "budget": {"fraction": 0.5}}, "selection")
    first = block.build(pool, cache_dir=tmp_path, seed=0)
    sel = Path(first.manifest_path).parent / "selected.jsonl"
    lines = sel.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace(f'"index": {json.loads(lines[0])["index"]},', '"index": 59,')
    sel.write_text("".join(lines))  # same line count, different content
    with caplog.at_level("WARNING", logger="effitrain.selection"):
        again = block.build(pool, cache_dir=tmp_path, seed=0)
    assert again.info["cache_hit"] is False and "does not match its checksum" in caplog.text
    assert again.train["id"] == first.train["id"]
    assert block.build(pool, cache_dir=tmp_path, seed=0).info["cache_hit"] is True  # rewritten, trusted again


def test_concurrent_manifest_writers_and_readers(tmp_path):
    """Writers of one key are serialised and readers never see half a manifest: no error, no stray folders."""
    from effitrain.selection import manifest as mf

    folder = tmp_path / "sel" / "random-abc"
    errors: list[BaseException] = []
    seen = []

    def writer(k: int) -> None:
        try:
            for _ in range(5):
                index = np.arange(20)
                mf.write(folder, {"key": "abc", "counts": {"pool_examples": 40, "kept_examples": 20}, "info": {}},
                         index, [f"id{i}" for i in index], np.full(20, float(k)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(40):
                got = mf.load(folder, "abc", 40)
                seen.append(got is not None)
                if got is not None:
                    assert len(got[1]) == 20
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)] + \
        [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert mf.load(folder, "abc", 40) is not None
    leftovers = sorted(p.name for p in folder.parent.iterdir())
    assert leftovers == ["random-abc", "random-abc.lock"], leftovers


def test_concurrent_select_force_on_the_same_key_both_succeed(tmp_path):
    args = ["select", "--force", "--json", f"--cache-dir={tmp_path / 'sel'}", "selection=random",
            "dataset.domains=[arithmetic,prose]", "dataset.max_docs_per_domain=40", "dataset.eval_examples_per_domain=4",
            "selection.budget.fraction=0.5"]
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert code == 0, err
        assert "Traceback" not in err
    manifests = {json.loads(out)["manifest"] for out, _, _ in results}
    assert len(manifests) == 1
    path = Path(manifests.pop())
    header = json.loads(path.read_text())
    from effitrain.selection import manifest as mf
    assert mf.load(path.parent, header["key"], header["counts"]["pool_examples"]) is not None
    assert sorted(p.name for p in path.parent.parent.iterdir()) == [path.parent.name, path.parent.name + ".lock"]


def test_build_once_rebuilds_an_edited_cache(tmp_path, caplog):
    from effitrain.data.cache import build_once

    calls = []

    def build(out: Path) -> None:
        calls.append(1)
        (out / "vocab.json").write_text('{"a": 1}')

    folder = build_once("tokenizers", "k1", build, cache_root=tmp_path)
    assert build_once("tokenizers", "k1", build, cache_root=tmp_path) == folder and len(calls) == 1
    (folder / "vocab.json").write_text('{"b": 2}')  # same size, other bytes
    with caplog.at_level("WARNING", logger="effitrain.cache"):
        build_once("tokenizers", "k1", build, cache_root=tmp_path)
    assert len(calls) == 2 and "changed since it was built" in caplog.text
    assert (folder / "vocab.json").read_text() == '{"a": 1}'
    (folder / "vocab.json").unlink()
    build_once("tokenizers", "k1", build, cache_root=tmp_path)
    assert len(calls) == 3
    (folder / "cache-123.arrow").write_text("added by datasets")  # extra files are not a reason to rebuild
    build_once("tokenizers", "k1", build, cache_root=tmp_path)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------ grad_norm
@pytest.mark.slow
def test_logged_grad_norm_is_before_clipping(train_in_process, tmp_path):
    """With clip_grad_norm=1e-6 (ZeRO-0, fp32 on CPU) the logged norm is the real one, not the clipped 1e-6, and it
    equals the first step's norm of an unclipped run (same weights, same batch)."""
    def first_norm(clip: str, name: str) -> float:
        train_in_process(["train.max_steps=1", f"train.clip_grad_norm={clip}", "parallelism=ddp"], tmp_path / name)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return next(x["grad_norm"] for x in lines if "grad_norm" in x)

    clipped = first_norm("1e-6", "clipped")
    unclipped = first_norm("0", "unclipped")
    assert clipped > 1e-3
    assert clipped == pytest.approx(unclipped, rel=1e-4)


def test_a_stage_placeholder_is_never_looked_up_on_the_hub():
    """A later stage's model is ``<final model of stage NAME>`` until that stage runs: ``check`` must not take it for
    a hub id (the lookup found nothing anyway, and importing huggingface_hub cost a quarter of check's second)."""
    probe = ("import sys; from effitrain.config.inputs import hub_cached_file, model_config_json\n"
             "assert hub_cached_file('<final model of stage base>', 'config.json') is None\n"
             "assert model_config_json('<final model of stage base>') is None\n"
             "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
