"""Shared fixtures: an isolated cache, the tiny-run overrides, and helpers to run the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


EOS = 256


class ByteTokenizer:
    """One id per UTF-8 byte (so ids and markers can be read back), EOS = 256: what packing needs from a tokenizer
    (call, eos id, a vocabulary to fingerprint)."""
    eos_token_id = EOS

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def get_vocab(self):
        return {bytes([i]).decode("latin-1"): i for i in range(256)} | {"<eos>": EOS}

# A run small enough for a test: seconds on two CPU cores, yet the real blocks, data pipeline and DeepSpeed engine.
TINY = [
    "dataset.max_docs_per_domain=120", "dataset.eval_examples_per_domain=8", "dataset.seq_len=64",
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
    "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=0", "train.eval_batches=1",
    "train.log_every=1", "scheduler.warmup_steps=1", "logger.progress_bar=false",
]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Caches (demo corpus, tokenizers, selection manifests) live in one temporary folder per test session, shared
    by the session's pytest-xdist workers (the cache serialises writers of one entry with a file lock, so a worker
    waits for what the other is building instead of building it twice)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "effitrain-cache"  # the basetemp every worker shares
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("effitrain-cache")
    os.environ["EFFITRAIN_CACHE"] = str(cache)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


def effitrain_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    """Run the installed `effitrain` command in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "effitrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def train_in_process():
    """Compose with overrides and call effitrain.pipeline.run in this process (DeepSpeed initialises once)."""
    from effitrain.config.compose import compose_config
    from effitrain.pipeline import run as train

    def run(overrides: list[str], run_dir: Path, tiny_model: bool = True) -> dict:
        tiny = [o for o in TINY if tiny_model or not o.startswith("model.")]
        composed = compose_config([*tiny, *overrides, f"run_dir={run_dir}"])
        return train(composed.cfg, run_dir=run_dir, argv=["effitrain", *overrides], recipes=composed.recipes)

    return run


@contextmanager
def sigterm_after_step(step: int, when=lambda state: True):
    """Within the block, a run in this process receives SIGTERM right after optimizer step ``step`` (of a stage for
    which ``when(state)`` holds): it saves a checkpoint there and stops, as a preempted job does.  Method hooks run
    before the signal, so their state at that step is what the checkpoint holds."""
    from effitrain.engine.events import EventBus

    original = EventBus.emit

    def emit(self, event, state):
        original(self, event, state)
        if event == "step_end" and state.step == step and when(state):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EventBus, "emit", emit)
        yield


def sigkill_at(args: list[str], marker: Path, timeout: float = 300) -> None:
    """Start ``effitrain ARGS`` in a subprocess and SIGKILL it as soon as ``marker`` exists (a checkpoint's
    ``COMPLETE``): the machine lost mid-run, with no chance to save.  Fails if the run ended before it was killed."""
    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def ctrl_c_after(args: list[str], metrics: Path, lines: int, *, cwd: Path | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``effitrain ARGS`` as a user does in a terminal and press Ctrl-C (SIGINT to the process) once
    ``metrics`` holds ``lines`` training log lines: the run saves at the end of the step it is in and exits."""
    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=cwd or REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_on_token_shards(tmp_path: Path, recipe: str, *overrides: str, steps: int = 3) -> tuple[dict, dict]:
    """``(summary, shards index)`` of ``+recipe=RECIPE`` trained in this process for ``steps`` steps from the token
    shards of a 300-document make_corpus folder (2 files, 2 domains) built with ``data.executor=local data.tasks=2``."""
    import json

    sys.path.insert(0, str(REPO / "scripts"))
    import make_corpus

    from effitrain.config.compose import compose_config
    from effitrain.pipeline import run

    folder = tmp_path / "corpus"
    make_corpus.generate(folder, docs=300, files=2, fmt="jsonl", seed=0, ids=True, domains=make_corpus.DOMAINS[:2])
    args = [*(o for o in TINY if not o.startswith("dataset.max_docs")), f"+recipe={recipe}", "dataset=local",
            f"dataset.path={folder}", "dataset.domain_field=domain", "data.executor=local", "data.tasks=2",
            f"train.max_steps={steps}", f"run_dir={tmp_path / 'run'}", *overrides]
    composed = compose_config(args)
    summary = run(composed.cfg, run_dir=tmp_path / "run", argv=["effitrain", *args], recipes=composed.recipes)
    return summary, json.loads((Path(summary["selection"]["token_shards"]) / "index.json").read_text())
