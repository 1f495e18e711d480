"""The sharded data engine (issue 24, first slice): a corpus of files tokenized and packed as datatrove tasks into
memory-mapped token shards, and training from them.

* the shards hold exactly the rows of the in-memory path (same tokenizer, same hold-out, same row order);
* a launch killed mid-stage and launched again runs only the tasks without a completion marker, and the shards are
  the bytes an uninterrupted build writes;
* a run trains from the shards from the console script, and resumes exactly after SIGKILL and from 2 processes to 1;
* the ``data:`` keys are validated at ``check`` time, one line each.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, effitrain_cli, sigkill_at
from effitrain.cli import main as cli_main

sys.path.insert(0, str(REPO / "scripts"))
import make_corpus  # noqa: E402  (scripts/ is not a package)


def _corpus(folder: Path, *, docs: int, files: int, fmt: str = "jsonl", ids: bool = True, domains: int = 3) -> Path:
    make_corpus.generate(folder, docs=docs, files=files, fmt=fmt, seed=0, ids=ids,
                         domains=make_corpus.DOMAINS[:domains])
    return folder


def _params(path: str, **extra):
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams

    load_builtin_blocks()
    return (LocalParams(path=[path], domain_field="domain", eval_examples_per_domain=4, seq_len=64, **extra),
            LlamaParams(vocab_size=512))


def _in_memory_rows(dataset, model, cache: Path):
    from datasets import DatasetDict

    from effitrain.data.build import build_local
    from effitrain.data.packing import domain_array, to_numpy
    from effitrain.data.splits import build_packed_splits

    pool = build_local(dataset, cache_dir=cache)
    tokenizer, train, eval_by_domain = build_packed_splits(
        dataset, model, DatasetDict(train=pool["train"], eval=pool["eval"]), cache_dir=cache,
        tokenizer_corpus=pool["train"])
    return (tokenizer, to_numpy(train), domain_array(train),
            {d: np.asarray(to_numpy(rows)) for d, rows in eval_by_domain.items()})


# ------------------------------------------------------------------------------------------ rows and tokenizer
def test_sharded_rows_equal_the_in_memory_rows_and_a_second_build_reuses_the_shards(tmp_path, monkeypatch, capsys):
    """Records without ids (the hold-out ranks positional ids that count records across files, blank ones
    included), compressed JSON lines, 3 tasks over 5 files, and a BPE sample smaller than the corpus (the sample is
    merged from the tasks' candidates): every train row, its domain, every eval row and the tokenizer agree."""
    from effitrain.data import tokenizer as tokenizer_module
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits

    folder = _corpus(tmp_path / "corpus", docs=400, files=4, fmt="jsonl.gz", ids=False)
    with gzip.open(folder / "part-00004.jsonl.gz", "wt", encoding="utf-8") as fh:  # a blank record mid-file
        for text in ("Lone words of a late file.", "   ", "The file's last document, after a blank one."):
            fh.write(json.dumps({"text": text, "domain": "news"}) + "\n")
    monkeypatch.setattr(tokenizer_module, "BPE_SAMPLE_DOCS", 150)  # < 400 train documents: a real sample
    dataset, model = _params(str(folder))
    cache = tmp_path / "cache"

    tokenizer, rows, domains, eval_rows = _in_memory_rows(dataset, model, cache)
    sharded_tokenizer, shards, sharded_eval = build_sharded_splits(dataset, model, EngineSettings("local", tasks=3),
                                                                   cache_dir=cache)
    assert sharded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert shards.rows.shape == rows.shape and len(rows) > 100
    assert np.array_equal(shards.rows[np.arange(len(shards))], rows)
    assert np.array_equal(shards.domains(), domains)
    assert sorted(sharded_eval) == sorted(eval_rows) == ["forum", "news", "science"]
    for domain in eval_rows:
        assert np.array_equal(sharded_eval[domain], eval_rows[domain]), domain
    # rows are uint16 on disk (a 512-entry vocabulary) and gathered as int32 through the memory maps
    assert shards.rows.parts[0].dtype == np.uint16 and isinstance(shards.rows.parts[0], np.memmap)
    assert shards.rows[[5, 0, 5]].dtype == np.int32

    capsys.readouterr()
    again = build_sharded_splits(dataset, model, EngineSettings("local", tasks=3), cache_dir=cache)[1]
    assert again.folder == shards.folder
    assert "data:" not in capsys.readouterr().out  # no stage ran: the scan and the shards came from the cache


def test_decomposed_shards_hold_the_in_memory_pieces_row_for_row(tmp_path):
    """dataset.packing=decompose (dataset decomposition) with data.executor: every train row is the in-memory path's
    -- the same pieces of the same documents (each cut by its own seeded generator, numbered within its domain
    across files), in the same seeded order per bucket, with the same domain and piece length -- rebuilt by the
    pack reduce from the token streams and each document's length; the eval rows stay concatenated rows."""
    from datasets import DatasetDict

    from effitrain.data.build import build_local
    from effitrain.data.engine import EngineSettings
    from effitrain.data.packing import domain_array, to_numpy
    from effitrain.data.sharded import build_sharded_splits
    from effitrain.data.splits import build_packed_splits

    folder = _corpus(tmp_path / "corpus", docs=300, files=5)
    dataset, model = _params(str(folder), packing="decompose", min_piece_len=8)
    pool = build_local(dataset, cache_dir=tmp_path / "memory")
    tokenizer, train, eval_rows = build_packed_splits(dataset, model, DatasetDict(train=pool["train"],
                                                                                   eval=pool["eval"]),
                                                      cache_dir=tmp_path / "memory", tokenizer_corpus=pool["train"])
    rows, piece_len = to_numpy(train), np.asarray(train["piece_len"])

    _, shards, sharded_eval = build_sharded_splits(dataset, model, EngineSettings("local", tasks=3),
                                                   cache_dir=tmp_path / "sharded")
    assert shards.column_names == ("input_ids", "domain", "piece_len")
    assert np.array_equal(shards.rows[np.arange(len(shards))], rows) and len(rows) > 50
    assert np.array_equal(shards.domains(), domain_array(train))
    assert np.array_equal(shards.piece_len(), piece_len)
    assert set(piece_len.tolist()) >= {8, 16, 32, 64}  # real buckets, not one length
    for domain, expected in eval_rows.items():
        assert np.array_equal(sharded_eval[domain], np.asarray(to_numpy(expected))), domain
    # the mechanism, whatever the in-memory path does: a piece is one document's tokens, so an end-of-text token
    # can only be a piece's last token
    eos = tokenizer.eos_token_id
    for row, length in zip(shards.rows[np.arange(len(shards))], shards.piece_len()):
        pieces = row.reshape(-1, int(length))
        assert not (pieces[:, :-1] == eos).any()


def test_rows_written_across_shard_boundaries_read_back_in_order(tmp_path):
    """Blocks of rows that straddle shards (7 rows a shard) come back row for row, by index, slice and gather,
    with their domains; a vocabulary over 16 bits is stored as uint32."""
    from effitrain.data.shards import ShardWriter, TokenShards, token_dtype

    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    rng = np.random.default_rng(0)
    blocks = [("a", rng.integers(0, 70_000, (n, 5))) for n in (3, 9, 1)] + [("b", rng.integers(0, 70_000, (12, 5)))]
    held_out = rng.integers(0, 70_000, (2, 5))
    writer = ShardWriter(tmp_path, seq_len=5, dtype=token_dtype(70_000), rows=25, eval_rows=2, domains=["a", "b"],
                         shard_rows=7)
    for domain, rows in blocks:
        writer.add(rows, domain)
    writer.add(held_out, "b", split="eval")
    writer.close()

    shards = TokenShards(tmp_path)
    expected = np.concatenate([rows for _, rows in blocks])
    assert [s["rows"] for s in shards.index["shards"]] == [7, 7, 7, 4] and shards.index["dtype"] == "uint32"
    assert np.array_equal(shards.rows[np.arange(25)], expected)
    order = rng.permutation(25)
    assert np.array_equal(shards.rows[order], expected[order])
    assert np.array_equal(shards.rows[5:16], expected[5:16]) and np.array_equal(shards.rows[-1], expected[-1])
    assert shards.domains().tolist() == ["a"] * 13 + ["b"] * 12
    assert list(shards.eval_by_domain()) == ["b"] and np.array_equal(shards.eval_by_domain()["b"], held_out)
    with pytest.raises(IndexError):
        shards.rows[[25]]


# ------------------------------------------------------------------------------- SIGKILL and relaunch
_BUILD = textwrap.dedent("""
    import sys
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.config.blocks.dataset import LocalParams
    from effitrain.config.blocks.model import LlamaParams
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits
    load_builtin_blocks()
    dataset = LocalParams(path=[sys.argv[1]], domain_field="domain", eval_examples_per_domain=4, seq_len=64)
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    executor = sys.argv[4] if len(sys.argv) > 4 else "local"
    _, shards, _ = build_sharded_splits(dataset, LlamaParams(vocab_size=512),
                                        EngineSettings(executor, tasks=4, workers=workers), cache_dir=sys.argv[2])
    print("shards:", shards.folder)
""")


def _build(corpus: Path, cache: Path, *, workers: int = 1, executor: str = "local") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BUILD, str(corpus), str(cache), str(workers), executor], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _same_shards(one: subprocess.CompletedProcess, other: subprocess.CompletedProcess) -> None:
    """Two builds' printed shard folders: the same content address and the same bytes in every file."""
    a = Path(one.stdout.split("shards: ")[1].split()[0])
    b = Path(other.stdout.split("shards: ")[1].split()[0])
    assert a.name == b.name
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "train-00000.npy" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _tokenize_stage(cache: Path) -> Path | None:
    """The tokenize stage's work folder (the one that holds the saved tokenizer), once it exists."""
    for stage in (cache / "data_engine").glob("*"):
        if (stage / "tokenizer" / "tokenizer.json").is_file():
            return stage
    return None


def _processes_naming(text: str) -> list[str]:
    """The command lines of the live processes (not zombies) that mention ``text``: a killed launch's children carry
    its arguments."""
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended while read
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc_dir.name}: {cmdline[:120]}")
    return found


def _assert_no_process_outlives(proc: subprocess.Popen, text: str) -> None:
    """After the launch ``proc`` was SIGKILLed, none of its processes (datatrove's manager, the pool workers) runs on
    for more than a moment (they are killed with it; a worker left running would finish its task beside the
    relaunch)."""
    deadline = time.time() + 10
    while (left := _processes_naming(text)) and time.time() < deadline:
        time.sleep(0.1)
    assert not left, f"processes outlived the killed launch {proc.pid}: {left}"


def _kill_once_a_tokenize_task_is_done(corpus: Path, cache: Path, workers: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(corpus), str(cache), str(workers)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done: list[str] = []
    while proc.poll() is None and time.time() < deadline:  # kill once a task of the 4 has marked itself done
        stage = _tokenize_stage(cache)
        done = sorted(p.name for p in (stage / "logs" / "completions").glob("*")) if stage else []
        if done:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    return proc


def test_a_launch_killed_mid_stage_reruns_only_the_unfinished_tasks_and_writes_the_same_shards(tmp_path):
    corpus = _corpus(tmp_path / "corpus", docs=1600, files=8)
    cache = tmp_path / "cache"
    proc = _kill_once_a_tokenize_task_is_done(corpus, cache, workers=1)
    _assert_no_process_outlives(proc, str(corpus))  # datatrove's manager process, forked even for one worker
    stage = _tokenize_stage(cache)
    done = sorted(int(p.name) for p in (stage / "logs" / "completions").glob("*"))
    missing = [r for r in range(4) if r not in done]
    assert done and missing

    relaunch = _build(corpus, cache)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    ran = ", ".join(map(str, missing))
    assert (f"data: tokenize: {len(missing)} of 4 tasks to run ({len(done)} done by an earlier launch; running "
            f"task{'s' if len(missing) > 1 else ''} {ran}) on local") in relaunch.stdout
    # datatrove's own task logs: a finished task started once, the unfinished ones once more in the relaunch
    logs = stage / "logs" / "logs"
    starts = {r: (logs / f"task_{r:05d}.log").read_text().count(f"Launching pipeline for rank={r}")
              for r in range(4) if (logs / f"task_{r:05d}.log").exists()}
    for r in done:
        assert starts[r] == 1, (r, starts)
    for r in missing:  # twice for the task the kill interrupted, once for those that had not started
        assert starts[r] in (1, 2), (r, starts)
    assert not (stage / "logs" / "completions").exists() and not (stage / "tokens").exists()  # reduced: dropped

    clean = _build(corpus, tmp_path / "clean_cache")
    assert clean.returncode == 0, clean.stderr[-3000:]
    _same_shards(relaunch, clean)


def test_the_pool_workers_of_a_killed_launch_die_with_it_and_mark_no_task_after_it(tmp_path):
    """With 2 workers the tasks run in a forked pool: SIGKILL of the launch kills them too, so no task of the killed
    launch finishes (and marks itself) after it -- the relaunch alone redoes them."""
    corpus = _corpus(tmp_path / "corpus", docs=1600, files=8)
    cache = tmp_path / "cache"
    proc = _kill_once_a_tokenize_task_is_done(corpus, cache, workers=2)
    stage = _tokenize_stage(cache)
    marked = sorted(p.name for p in (stage / "logs" / "completions").glob("*"))
    _assert_no_process_outlives(proc, str(corpus))
    time.sleep(1.0)  # a surviving worker would go on to mark its task
    assert sorted(p.name for p in (stage / "logs" / "completions").glob("*")) == marked
    relaunch = _build(corpus, cache)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"data: tokenize: {4 - len(marked)} of 4 tasks to run" in relaunch.stdout


def test_the_ray_executor_writes_the_bytes_of_the_local_one(tmp_path):
    """data.executor=ray: with no RAY_ADDRESS and no `ray start` here, the launch starts a Ray of this machine (as
    on a laptop) and the 4 tasks of each stage run as Ray tasks; the shards are those the local executor writes."""
    corpus = _corpus(tmp_path / "corpus", docs=400, files=8)
    env_has_cluster = os.environ.get("RAY_ADDRESS")
    assert not env_has_cluster, "this test starts its own Ray"
    on_ray = _build(corpus, tmp_path / "ray_cache", workers=2, executor="ray")
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "data: tokenize: 4 of 4 tasks to run on ray" in on_ray.stdout
    ray_logs = list((tmp_path / "ray_cache" / "data_engine").glob("*/logs/logs/task_00003.log"))
    assert ray_logs, "datatrove's Ray executor wrote no task log"
    local = _build(corpus, tmp_path / "local_cache", workers=2)
    assert local.returncode == 0, local.stderr[-3000:]
    _same_shards(on_ray, local)


def test_a_bad_line_found_by_a_task_is_one_line_and_nothing_is_trained(tmp_path):
    """A corpus too big for the up-front read (here: the threshold set to 0) is read only by the tasks: the task that
    meets a malformed line stops the launch with the file and line, exit 2, no traceback."""
    corpus = _corpus(tmp_path / "corpus", docs=200, files=4)
    lines = (corpus / "part-00002.jsonl").read_text().splitlines(keepends=True)
    lines[20] = '{"text": broken\n'
    (corpus / "part-00002.jsonl").write_text("".join(lines))
    script = textwrap.dedent(f"""
        import sys
        import effitrain.data.inspect as inspect
        inspect.SMALL_BYTES = 0
        from effitrain.cli import main
        sys.exit(main(["dataset=local", "dataset.path={corpus}", "data.executor=local", "data.tasks=2",
                       "train.max_steps=1", "run_dir={tmp_path / 'run'}"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
    assert err[0] == (f"effitrain: error: dataset.path: '{corpus / 'part-00002.jsonl'}' line 21 is not valid JSON "
                      f"(Expecting value at column 10); every line must be one JSON object")
    assert "Traceback" not in result.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------- config
def _check(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["check", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["data.exector=local"], ["data.exector: unknown key", "did you mean 'executor'", "valid keys: executor"]),
    (["data.executor=spark"], ["data.executor", "spark", "local", "slurm", "ray"]),
    (["data.tasks=0"], ["data.tasks", ">= 1"]),
    (["data.executor=local"], ["data.executor=local runs over the files of dataset=local", "dataset=demo"]),
    (["dataset=local", "dataset.path=CORPUS", "data.executor=local", "selection=s2l"],
     ["selection=s2l stays on one node", "use selection=none, dsir, dedup"]),
    (["dataset=local", "dataset.path=CORPUS", "data.executor=local", "+recipe=in_context_pretraining",
      "dataset.packing=decompose"], ["[curriculum_reads_its_data]", "(curriculum is in_context)"]),
    (["dataset=local", "dataset.path=CORPUS", "data.executor=slurm", "data.slurm_preset=slurm_gpus"],
     ["data.slurm_preset: unknown launcher preset 'slurm_gpus'", "did you mean 'slurm_gpu'"]),
])
def test_data_keys_are_checked_in_one_line(args, expected, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    code, err = _check([a.replace("CORPUS", str(corpus)) for a in args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("effitrain: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize("recipe", ["difficulty_curriculum", "quality_curriculum_avg", "in_context_pretraining", "delt",
                                    "meco", "untie_knots"])
def test_curricula_with_a_sharded_form_pass_check_with_data_executor(recipe, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(50)))
    code, err = _check(["dataset=local", f"dataset.path={corpus}", "dataset.eval_examples_per_domain=4",
                        "data.executor=local", f"+recipe={recipe}"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------ training from shards
# TINY without its demo-only key; six steps, a checkpoint every two
RUN = [*(o for o in TINY if not o.startswith("dataset.max_docs")), "dataset.domain_field=domain", "train.max_steps=6",
       "train.micro_batch_size=2", "train.save_every=2", "train.keep_checkpoints=3", "train.save_final_model=false"]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("engine") / "corpus", docs=400, files=4)


@pytest.mark.slow
def test_the_console_script_trains_from_shards_and_resumes_exactly_after_sigkill(tmp_path, corpus_dir):
    """The issue's command line on a make_corpus folder; then the same run SIGKILLed after its step-4 checkpoint and
    resumed: steps 5 and 6 see the same rows and give the uninterrupted run's losses."""
    args = ["dataset=local", f"dataset.path={corpus_dir}", "data.executor=local", "data.tasks=2", *RUN]
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    shards = Path(summary["selection"]["token_shards"])
    index = json.loads((shards / "index.json").read_text())
    assert summary["selection"]["engine"] == "datatrove local, 2 tasks"
    assert summary["train_sequences"] == index["rows"] == sum(s["rows"] for s in index["shards"])

    sigkill_at([*args, f"run_dir={killed}"], killed / "checkpoints" / "step_00000004" / "COMPLETE")
    assert max(_losses(killed)) < 6
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data:" not in result.stdout  # the shards came from the cache: no stage ran again
    expected, resumed = _losses(full), _losses(killed)
    assert [resumed[s] for s in (5, 6)] == pytest.approx([expected[s] for s in (5, 6)], abs=1e-6)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_to_one_continue_the_loss_curve_on_shards(tmp_path, corpus_dir):
    """A ZeRO-2 run of 2 processes on token shards, stopped after its step-2 checkpoint, resumes with 1 process
    (through the universal checkpoint): the sampler converts its position over the same shard rows."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["dataset=local", f"dataset.path={corpus_dir}", "data.executor=local", "data.tasks=2", *RUN,
            "parallelism=zero2", "train.grad_accum=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    result = subprocess.run([*torchrun, "-m", "effitrain.cli", *args, f"run_dir={two}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reference = _losses(two)

    one = tmp_path / "one"
    shutil.copytree(two, one)
    for ckpt in (one / "checkpoints").iterdir():
        if int(re.findall(r"\d+", ckpt.name)[0]) > 2:
            shutil.rmtree(ckpt)
    (one / "summary.json").unlink()
    result = subprocess.run([sys.executable, "-m", "effitrain.cli", "resume", str(one)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resume: 2 -> 1 processes" in result.stdout + result.stderr
    after = _losses(one)
    assert [after[s] for s in (3, 4, 5, 6)] == pytest.approx([reference[s] for s in (3, 4, 5, 6)], abs=1e-5)


# ------------------------------------------------------------------------- orders over the whole corpus
def test_an_order_sorted_in_runs_on_disk_is_the_in_memory_order(tmp_path):
    """Scores with ties, NaN, -0.0 and infinities, arriving in odd blocks, sorted in 12 runs of a small budget and
    merged: the rows in exactly numpy's lexsort order by (score, tie-break key), rows of a tie in index order."""
    from effitrain.curriculum.row_scores import rank_difficulty
    from effitrain.data.external_order import sorted_order, tiebreak_keys

    rng = np.random.default_rng(0)
    n = 20_011
    scores = rng.integers(0, 4, n).astype(float)
    for value in (np.nan, -np.nan, -0.0, np.inf, -np.inf):
        scores[rng.choice(n, 30, replace=False)] = value
    blocks = (scores[i:i + 777] for i in range(0, n, 777))
    order = sorted_order(blocks, n, 3, tmp_path / "order.npy", budget_bytes=56 * 1700)
    assert isinstance(order, np.memmap) and order.dtype == np.int64
    assert np.array_equal(order, rank_difficulty(scores, 3)[0])
    assert np.array_equal(order, np.lexsort((tiebreak_keys(3, 0, n), scores)))
    assert not np.array_equal(order, rank_difficulty(scores, 4)[0])  # the ties follow the seed
    assert len(np.unique(tiebreak_keys(3, 0, n))) == n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["order.npy"]  # the runs are gone


@pytest.mark.parametrize("curriculum, params", [
    ("scored_order", {"order": "descending", "fit_to_run": False}),
    ("scored_order", {"order": "ascending", "fit_to_run": True}),  # 400 of the 1,000 rows: a run of 100 steps
    ("difficulty", {"direction": "easy_first", "mode": "sample"}),
    ("difficulty", {"direction": "hard_first", "mode": "weight"}),
    ("mixture", {}),  # domain weights per step; each domain's rows from its own seeded stream
])
def test_a_domain_order_over_token_shards_is_the_in_memory_curriculum_order(tmp_path, monkeypatch, curriculum,
                                                                           params):
    """The curricula that order every row by a declared domain order, on token shards (sorted on disk in runs,
    memory-mapped) and on the same rows in memory: the same order, so the same batches; and a domain mixture."""
    import datasets

    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.data import external_order
    from effitrain.data.shards import ShardWriter, TokenShards
    from effitrain.registry import REGISTRY
    from effitrain.timeline import parse_timeline

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(external_order, "ORDER_BUDGET_BYTES", 56 * 300)  # 1,000 rows: 4 runs of at most 300
    load_builtin_blocks()
    rng = np.random.default_rng(1)
    names = ["code", "math", "prose"]
    domains = rng.choice(names, 1000)
    rows = rng.integers(0, 500, (1000, 8))
    (tmp_path / "shards").mkdir()
    writer = ShardWriter(tmp_path / "shards", seq_len=8, dtype=np.dtype(np.uint16), rows=1000, eval_rows=0,
                         domains=names, shard_rows=256)
    for name in names:  # the shards hold the rows domain by domain, as packing writes them
        writer.add(rows[domains == name], name)
    writer.close()
    shards = TokenShards(tmp_path / "shards")
    in_memory = datasets.Dataset.from_dict({"input_ids": np.concatenate([rows[domains == n] for n in names]).tolist(),
                                            "domain": np.concatenate([domains[domains == n] for n in names]).tolist()})
    ordered = curriculum != "mixture"
    block = REGISTRY.parse("curriculum", {"name": curriculum, **params,
                                          **({"domain_order": ["math", "prose", "code"]} if ordered else {})},
                           "curriculum")
    timeline = parse_timeline({
        "competence": {"pacing": {"function": "linear", "start": 0.2, "until": 0.5}},
        "mixture": {"unit": "fraction", "points": [{"at": 0, "value": {"code": 0.2, "math": 0.3, "prose": 0.5}}]},
    }).resolve(max_steps=100, tokens_per_step=32)
    layout = dict(seed=5, micro_batch_size=2, grad_accum=2, world_size=1, rank=0, timeline=timeline)
    on_disk, in_ram = block.build(shards, **layout), block.build(in_memory, **layout)
    if params.get("mode") == "weight":
        assert np.array_equal(on_disk.difficulty, in_ram.difficulty)
    elif not ordered:  # a mixture's streams: the rows of each domain, the same on both
        assert all(np.array_equal(a, b) for a, b in zip(on_disk.rows_of, in_ram.rows_of))
    else:
        # the whole order stays on disk; the run's subset of it (fit_to_run) is small and in memory
        assert _memory_mapped(on_disk.order) != params.get("fit_to_run", False) and not _memory_mapped(in_ram.order)
        assert np.array_equal(on_disk.order, in_ram.order)
        first = set(np.asarray(in_memory["domain"])[np.asarray(in_ram.order[:10])].tolist())
        assert first == {"code" if params.get("order") == "descending" else "math"}
    assert list(itertools.islice(iter(on_disk), 8)) == list(itertools.islice(iter(in_ram), 8))


def _shards_and_the_same_rows_in_memory(tmp_path: Path):
    """``(tokenizer, shards, rows, in_memory)``: token shards of a 200-document corpus (2 tasks) and a ``datasets``
    table of the same rows and domains, as the in-memory packing gives a curriculum."""
    import datasets

    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.data.engine import EngineSettings
    from effitrain.data.sharded import build_sharded_splits

    load_builtin_blocks()
    dataset, model = _params(str(_corpus(tmp_path / "corpus", docs=200, files=2)))
    tokenizer, shards, _ = build_sharded_splits(dataset, model, EngineSettings("local", tasks=2),
                                                cache_dir=tmp_path / "cache")
    rows = shards.rows[np.arange(len(shards))]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=rows.shape[1]),
                                  "domain": datasets.Value("string")})
    in_memory = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "domain": shards.domains().tolist()},
                                           features=features)
    return tokenizer, shards, rows, in_memory


@pytest.mark.parametrize("curriculum, params", [
    ("scored_order", {"order": "ascending", "fit_to_run": False}),
    ("difficulty", {"direction": "easy_first", "mode": "weight"}),
])
def test_a_scorer_over_token_shards_orders_the_rows_as_in_memory(tmp_path, monkeypatch, curriculum, params):
    """A curriculum.scorer (the perplexity scorer's pool proxy, trained on the rows' texts) on token shards: the rows
    are decoded a block at a time into an Arrow file that datasets memory-maps, and the order is sorted on disk --
    the same scores, the same order and the same batches as the same rows in memory."""
    from effitrain.curriculum import row_scores
    from effitrain.data import external_order
    from effitrain.data.packing import domain_array
    from effitrain.registry import REGISTRY
    from effitrain.timeline import parse_timeline

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(row_scores, "_ROW_BLOCK", 64)  # several decode blocks
    monkeypatch.setattr(external_order, "ORDER_BUDGET_BYTES", 56 * 100)  # several runs
    tokenizer, shards, rows, in_memory = _shards_and_the_same_rows_in_memory(tmp_path)
    scorer = {"name": "perplexity", "proxy_steps": 3, "proxy_hidden_size": 16, "proxy_layers": 1, "batch_size": 8}
    block = REGISTRY.parse("curriculum", {"name": curriculum, **params, "scorer": scorer}, "curriculum")
    timeline = parse_timeline({"competence": {"pacing": {"function": "linear", "start": 0.2, "until": 0.5}}}) \
        .resolve(max_steps=50, tokens_per_step=256)
    layout = dict(seed=5, micro_batch_size=2, grad_accum=2, world_size=1, rank=0, timeline=timeline,
                  tokenizer=tokenizer)
    on_disk = block.build(shards, **layout)
    scored = tmp_path / "cache" / "curriculum"
    assert not list(scored.glob(".row-texts-*"))  # the texts went with the scoring
    (first_scores,) = scored.glob("row-scores-*.npy")
    shutil.move(scored, tmp_path / "scored_from_shards")  # no cached scores or proxy: in memory scores afresh
    in_ram = block.build(in_memory, **layout)
    (second_scores,) = scored.glob("row-scores-*.npy")
    assert second_scores.name == first_scores.name  # the same cache key: the same rows and scorer settings
    assert np.array_equal(np.load(second_scores), np.load(tmp_path / "scored_from_shards" / first_scores.name))
    assert len(rows) > 100 and np.array_equal(domain_array(in_memory), shards.domains())
    if params.get("mode") == "weight":
        assert np.array_equal(on_disk.difficulty, in_ram.difficulty)
        assert len(set(np.round(on_disk.difficulty, 6).tolist())) == len(rows)  # real scores, not ties
    else:
        assert _memory_mapped(on_disk.order) and np.array_equal(on_disk.order, in_ram.order)
    assert list(itertools.islice(iter(on_disk), 8)) == list(itertools.islice(iter(in_ram), 8))


def test_delt_scores_token_shards_in_blocks_and_orders_them_as_in_memory(tmp_path, monkeypatch):
    """curriculum=delt on token shards: the LQS proxy, its annotated rows and the ridge scorer read the shards' rows
    a block at a time (reading them whole fails here), and the scores, the folding order and the batches equal
    those of the same rows in memory (the same cache key: the rows' bytes and domains hash alike)."""
    from effitrain.data.shards import ShardRows
    from effitrain.registry import REGISTRY

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    tokenizer, shards, rows, in_memory = _shards_and_the_same_rows_in_memory(tmp_path)
    block = REGISTRY.parse("curriculum", {"name": "delt", "select_ratio": 0.75, "layers": 2, "target_domain": "news",
                                          "target_rows": 8, "annotate_rows": 24, "proxy_steps": 4, "ct_states": 2,
                                          "proxy_batch_size": 4, "proxy_hidden_size": 16, "proxy_layers": 1},
                           "curriculum")
    layout = dict(seed=5, micro_batch_size=2, grad_accum=2, world_size=1, rank=0)

    def whole(self, dtype=None, copy=None):
        raise AssertionError("the shards' rows were read whole")

    with monkeypatch.context() as patched:
        patched.setattr(ShardRows, "__array__", whole)
        on_disk = block.build(shards, **layout)
    lqs_cache = tmp_path / "cache" / "curriculum" / "lqs"
    (first,) = lqs_cache.glob("*.npz")
    shutil.move(lqs_cache, tmp_path / "lqs_from_shards")  # no cached scores: in memory scores afresh
    in_ram = block.build(in_memory, **layout)
    (second,) = lqs_cache.glob("*.npz")
    assert second.name == first.name
    assert len(rows) > 100 and len(set(np.round(on_disk.scores, 9).tolist())) == len(rows)  # predicted, not ties
    assert np.array_equal(on_disk.scores, in_ram.scores)
    assert len(on_disk.order) == int(0.75 * len(rows)) and np.array_equal(on_disk.order, in_ram.order)
    assert list(itertools.islice(iter(on_disk), 8)) == list(itertools.islice(iter(in_ram), 8))


def _memory_mapped(array) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_the_tokenize_tasks_read_each_files_records_from_sorted_keys(tmp_path):
    """The kept and held-out (file, record) pairs are read as sorted int64 keys, and each file gets a set of its own
    records only (a Python set of every pair made each tokenize task grow with the selection)."""
    from effitrain.data.engine import document_keys, records_of

    pairs = np.array([[2, 7], [0, 3], [2, 1], [0, 0], [1, 2**31 + 5], [3, 0]], dtype=np.int64)
    np.save(tmp_path / "pairs.npy", pairs)
    keys = document_keys(str(tmp_path / "pairs.npy"))
    assert keys.dtype == np.int64 and list(keys) == sorted(keys)
    assert records_of(keys, 0) == {0, 3} and records_of(keys, 1) == {2**31 + 5}
    assert records_of(keys, 2) == {1, 7} and records_of(keys, 3) == {0} and records_of(keys, 4) == set()
    np.save(tmp_path / "none.npy", np.zeros((0, 2), dtype=np.int64))
    assert records_of(document_keys(str(tmp_path / "none.npy")), 0) == set()
