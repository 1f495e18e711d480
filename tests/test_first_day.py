"""A new user's first day, tested the user's way where only that shows the point: the console script on an empty
cache and an empty torch extensions folder, a pseudo-terminal, a shell with variables left from other launches.

The suite's other tests run in-process, with the session's warm cache and captured output; the bugs of the first
day ("+recipe=lora fails on a fresh cache", "the step lines never reach the terminal") passed them all.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY
from effitrain.cli import main as cli_main
from effitrain.registry import ConfigError

EFFITRAIN = str(Path(sys.executable).parent / "effitrain")  # the console script `make` installs into .venv/bin


# ------------------------------------------------------------------------------------------ leaked launch variables
def _check(capsys, monkeypatch, env: dict[str, str]) -> tuple[int, str]:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = cli_main(["check"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set in the environment but MASTER_ADDR and MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "WORLD_SIZE=2 is set in the environment but MASTER_PORT is not"),
    ({"RANK": "1"}, "RANK=1 is set in the environment but WORLD_SIZE is 1"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=3 is set in the environment but "
                                                                                "WORLD_SIZE is 2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment: expected a positive whole number"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' in the environment"),
])
def test_launch_variables_left_in_the_shell_are_named_in_one_line(capsys, monkeypatch, env, expected):
    code, err = _check(capsys, monkeypatch, env)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"effitrain: error: {expected}"), err
    assert "unset RANK, LOCAL_RANK, WORLD_SIZE" in err or "unset it" in err


def test_a_batch_script_or_salloc_shell_of_a_two_task_job_is_one_process_with_a_note(capsys, monkeypatch):
    # what sbatch -n 2 gives its batch script (read off a real SLURM): the allocation's task count and PROCID 0,
    # but no job step -- srun would set SLURM_STEP_NUM_TASKS.  It once read as a world of two and waited forever.
    from effitrain.cluster.slurm_env import slurm_world

    batch = {"SLURM_JOB_ID": "3", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert slurm_world(batch) is None
    assert slurm_world({**batch, "SLURM_STEP_NUM_TASKS": "2"})["WORLD_SIZE"] == "2"  # srun -n 2
    assert slurm_world({**batch, "SLURM_STEP_NUM_TASKS": "1"}) is None               # srun -n 1 in the allocation
    code, err = _check(capsys, monkeypatch, batch)
    assert code == 0
    assert "this SLURM job has 2 tasks, but effitrain was started once (not by srun)" in err


def test_a_rendezvous_that_waits_says_for_whom(monkeypatch, capsys):
    from effitrain.parallel import dist

    monkeypatch.setattr(dist, "RENDEZVOUS_NOTE_AFTER_S", 0.05)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29411",
                       dist._ORIGIN: "the environment"}.items():
        monkeypatch.setenv(key, value)
    with dist._said_while_waiting():
        time.sleep(0.5)  # the rendezvous, still waiting for rank 1
    err = capsys.readouterr().err
    assert "rank 0: waiting for all 2 processes of this run to join at 127.0.0.1:29411 (WORLD_SIZE=2, RANK=0 from " \
           "the environment); if this is meant to be one process, stop it (Ctrl-C) and unset RANK" in err


def test_a_stale_torch_extension_lock_is_named_while_waiting(tmp_path, monkeypatch, capsys):
    # a first compile that was killed leaves build_dir/lock behind, and torch waits on it forever in silence
    from torch.utils.file_baton import FileBaton

    from effitrain.parallel import dist

    monkeypatch.setattr(dist, "RENDEZVOUS_NOTE_AFTER_S", 0.05)
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)  # undone after the test
    dist.say_when_waiting_on_extension_locks()
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    threading.Timer(0.5, lock.unlink).start()  # the user deletes it, as the message says
    FileBaton(str(lock)).wait()
    assert f"waiting for the lock {lock}: another process is compiling this torch extension, or a compile that " \
           f"was killed left the lock behind (then delete that file)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ sweeps
@pytest.mark.parametrize("setup, key, expected", [
    ("manifest", "hydra.sweep.dir", "already holds a sweep"),
    ("user_files", "hydra.sweep.dir", "is a folder that is not empty"),
    ("user_files", "run_dir", "is a folder that is not empty"),
    ("file", "run_dir", "is a file; a sweep's root is a folder"),
])
def test_a_sweep_root_is_protected_however_it_is_named(tmp_path, capsys, setup, key, expected):
    root = tmp_path / "root"
    if setup == "file":
        root.write_text("mine")
    else:
        root.mkdir()
        (root / ("sweep.json" if setup == "manifest" else "notes.md")).write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = cli_main(["-m", f"{key}={root}", *TINY, "train.seed=0,1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{key}: '{root}' {expected}" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_two_roots_for_one_sweep_are_refused(tmp_path, capsys):
    code = cli_main(["-m", f"run_dir={tmp_path / 'a'}", f"hydra.sweep.dir={tmp_path / 'b'}", *TINY, "train.seed=0,1"])
    assert code == 2 and "name two roots for one sweep" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ PEFT targets
def test_lora_on_a_model_without_its_target_layers_is_refused_at_check_with_peft_s_default(tmp_path, capsys):
    # the LoRA recipe targets q_proj/v_proj (the paper's W_q, W_v); GPT-2 fuses them in c_attn.  It used to pass
    # `check` and fail 20 s into the launch inside PEFT.
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=128)).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    code = cli_main(["check", "model=pretrained", f"model.path={folder}", "+recipe=lora"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"peft.target_modules: ['q_proj', 'v_proj'] name no layer of the gpt2 model in '{folder}'; its layers: " \
           f"c_attn, c_fc, c_proj" in err
    assert err.rstrip().endswith("PEFT's default for gpt2: peft.target_modules=[c_attn]")
    code = cli_main(["check", "model=pretrained", f"model.path={folder}", "+recipe=lora", "peft.target_modules=[c_attn]"])
    assert code == 0, capsys.readouterr().err


def test_peft_s_default_targets_are_read_from_peft_itself():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as ia3,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora)

    from effitrain.config.inputs import peft_default_targets

    for model_type in ("gpt2", "llama", "gpt_neox", "qwen2", "opt"):
        assert peft_default_targets(model_type) == lora[model_type]
        assert peft_default_targets(model_type, "IA3") == ia3[model_type]
    assert peft_default_targets("no_such_model") is None


# ------------------------------------------------------------------------------------------------------ memory
def test_the_peak_memory_figure_starts_afresh_for_each_run_in_a_process():
    import numpy as np

    from effitrain.engine.metrics import peak_rss_bytes, reset_peaks

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("resetting the peak needs Linux's /proc/self/clear_refs")
    ballast = np.ones(300 * 2 ** 20 // 8)  # an earlier sweep member's 300 MB
    high = peak_rss_bytes()
    del ballast
    reset_peaks()
    assert peak_rss_bytes() < high - 200 * 2 ** 20


# ------------------------------------------------------------------------------------------------------ a terminal
def _run_in_pty(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> tuple[str, float]:
    """Run a command on a pseudo-terminal (stdin, stdout and stderr all a tty, as in a user's shell); returns what
    the terminal showed and the seconds until its first byte."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec the console script
        os.chdir(cwd)
        os.execve(args[0], args, env)
    # a terminal window of 120 x 40 (a fresh pty has 0 columns, where tqdm draws a bar of nothing)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    start, first, chunks = time.monotonic(), None, []
    deadline = start + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            first = first if first is not None else time.monotonic() - start
            chunks.append(chunk)
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = b"".join(chunks).decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text[-3000:]
    return text, first


@pytest.mark.slow
def test_a_run_on_a_terminal_shows_the_bar_and_its_step_and_eval_lines(tmp_path):
    # stdout is redirected into third_party.log while the libraries run; the step lines once went there through
    # tqdm.write's default stream, and a user on a terminal saw only the bar and the final line
    env = {**os.environ, "TERM": "xterm"}
    env.pop("EFFITRAIN_VERBOSE", None)
    args = [EFFITRAIN, f"run_dir={tmp_path / 'run'}", *[o for o in TINY if o != "logger.progress_bar=false"],
            "train.max_steps=6", "train.log_every=2", "train.eval_every=3"]
    text, _ = _run_in_pty(args, env, tmp_path)
    lines = [re.sub(r".*\r", "", line) for line in text.splitlines()]  # what stays on screen after the bar redraws
    assert lines[0].startswith("effitrain: default (model=llama, 6 steps) in ")
    for step in (2, 4, 6):
        assert any(re.match(rf"step {step}: loss=\S+  lr=", line) for line in lines), text
    for step in (3, 6):
        assert any(re.match(rf"step {step}: eval_loss=", line) for line in lines), text
    assert "step/s]" in text or "s/step]" in text  # tqdm's bar was drawn on the terminal
    assert any(line.startswith("finished: 6 steps") for line in lines)
    assert "step 2: loss=" not in (tmp_path / "run" / "third_party.log").read_text()


@pytest.mark.slow
def test_a_fine_tuning_recipe_runs_alone_on_an_empty_cache(tmp_path):
    # the console script in a fresh process on an empty cache and extensions folder: its base model (model=demo_base)
    # is pre-trained first by a run that composes its own config inside the console script's running Hydra app
    root = tmp_path
    env = {**os.environ, "EFFITRAIN_CACHE": str(root / "cache"), "TORCH_EXTENSIONS_DIR": str(root / "extensions"),
           "OMP_NUM_THREADS": "1"}
    for key in ("PYTHONPATH", "EFFITRAIN_VERBOSE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    (root / "work").mkdir()
    assert not (root / "cache").exists()
    result = subprocess.run([EFFITRAIN, "+recipe=lora", "train.max_steps=2", "train.eval_batches=1", "run_dir=lora"],
                            env=env, cwd=root / "work", capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model=demo_base: no model to fine-tune was given" in result.stdout  # the cold path: base model trained
    summary = json.loads((root / "work" / "lora" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 2
    assert not (root / "extensions").exists() or not any((root / "extensions").rglob("*.so")), \
        "a one-process run compiled a torch extension"


def test_a_base_model_another_launch_is_pre_training_is_waited_for_not_refused(tmp_path, capsys):
    # two sweeps (or test workers) that need the same model=demo_base at once: the second once refused with "run_dir
    # ... is in use by a live run"; it waits for the first, saying so, and then goes on (reusing its model)
    from effitrain.models.base import _only_builder

    folder = tmp_path / "base_models" / "0123abcd"
    folder.parent.mkdir()
    held = tmp_path / "held"
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from filelock import FileLock
        with FileLock({str(folder.parent / "0123abcd.lock")!r}):
            pathlib.Path({str(held)!r}).touch()
            time.sleep(2)  # the first launch, pre-training
    """)])
    try:
        while not held.exists():
            time.sleep(0.02)
        start = time.monotonic()
        with _only_builder(folder):
            waited = time.monotonic() - start
    finally:
        first.wait(timeout=30)
    assert waited > 1.0
    assert f"model=demo_base: another launch is pre-training this base model ({folder}); waiting for it" in \
        capsys.readouterr().out
