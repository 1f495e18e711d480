"""Hostile cases for run directories, checkpoints, exits and the console (docs/reliability.md).

Every refusal is one line on stderr naming the problem, exit status 2, no traceback, and leaves every file that
existed before exactly as it was.  The bad-data, config and cache cases are in tests/test_reliability_inputs.py.
"""

from __future__ import annotations

import hashlib
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

import pytest
import yaml

from conftest import REPO, TINY, effitrain_cli


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (and the roots' siblings, where an overwrite would park an old run) with its
    content hash: "nothing changed" means this mapping is equal before and after."""
    files = {}
    for root in roots:
        for base in {root, root.parent}:
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*")):
                if path.is_file() and ".effitrain-lock" not in path.name:
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_refused(result, *fragments: str) -> None:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in result.stderr, err[-2000:]
    assert len(err.splitlines()) == 1, err
    assert err.startswith("effitrain: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def mark_run(folder: Path, config: dict | None = None) -> Path:
    """A folder that effitrain made: its marker (and, optionally, the config it was run with)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".effitrain-run").write_text("{}\n")
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def composed(*overrides: str) -> dict:
    from effitrain.config.compose import compose_config

    return compose_config([*TINY, *overrides]).cfg


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another live process that holds the folder's run lock, as a running effitrain would."""
    code = textwrap.dedent(f"""
        import fcntl, json, os, sys, time
        fd = os.open({str(folder / '.effitrain-lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": os.getpid(), "host": "testhost"}}).encode())
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------------------------------------ run directory
def test_the_current_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_refused(effitrain_cli("check", "run_dir=.", cwd=tmp_path), "is the current folder")
    assert_refused(effitrain_cli("run_dir=.", *TINY, cwd=tmp_path), "is the current folder")
    assert snapshot(tmp_path) == before


def test_the_home_folder_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert_refused(effitrain_cli("check", f"run_dir={home}", env={"HOME": str(home)}), "is the home folder")


def test_a_folder_above_the_home_folder_is_refused(tmp_path):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    assert_refused(effitrain_cli("check", f"run_dir={tmp_path}", env={"HOME": str(home)}), "contains the home folder")


def test_the_filesystem_root_is_refused():
    assert_refused(effitrain_cli("check", "run_dir=/"), "is the filesystem root")


def test_an_empty_run_dir_is_refused(tmp_path):
    assert_refused(effitrain_cli("check", "run_dir=", cwd=tmp_path), "run_dir: is empty")
    assert_refused(effitrain_cli("run_dir=", *TINY, cwd=tmp_path), "run_dir: is empty")
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "results"
    target.write_text("precious")
    for verb in (["check"], []):
        assert_refused(effitrain_cli(*verb, f"run_dir={target}", *TINY), "is a file, not a folder")
    assert target.read_text() == "precious"


def test_a_run_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "results").write_text("precious")
    assert_refused(effitrain_cli("check", f"run_dir={tmp_path / 'results' / 'run'}"), "is a file, not a folder")


def test_a_folder_of_user_files_is_never_written_into(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("chapter 1")
    (work / "config.yaml").write_text("mine: true\n")   # a stray config.yaml does not make a folder a run
    before = snapshot(work)
    for extra in ([], ["overwrite=true"], ["resume=auto"]):
        assert_refused(effitrain_cli("check", f"run_dir={work}", *extra), "is not an effitrain run", "thesis.tex")
        assert_refused(effitrain_cli(f"run_dir={work}", *TINY, *extra), "is not an effitrain run")
    assert snapshot(work) == before


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    run = mark_run(tmp_path / "run", composed())
    before = snapshot(run)
    assert_refused(effitrain_cli("check", f"run_dir={run}", *TINY), "already holds a run", "resume=auto",
                   "overwrite=true")
    assert snapshot(run) == before


@pytest.mark.parametrize("extra", [["resume=auto"], ["overwrite=true"]])
def test_a_run_in_use_by_a_live_process_is_refused(tmp_path, extra):
    run = mark_run(tmp_path / "run", composed())
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        assert_refused(effitrain_cli("check", f"run_dir={run}", *TINY, *extra), "in use by a live run",
                       f"pid {holder.pid}")
        assert_refused(effitrain_cli(f"run_dir={run}", *TINY, *extra), "in use by a live run")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    run = mark_run(tmp_path / "run", composed())
    holder = hold_lock(run)
    holder.kill()
    holder.wait()
    assert (run / ".effitrain-lock").is_file()   # the file is still there; the kernel dropped the lock with the pid
    result = effitrain_cli("check", f"run_dir={run}", *TINY, "resume=auto")
    assert result.returncode == 0, result.stderr


def test_resume_from_a_missing_checkpoint_is_refused(tmp_path):
    assert_refused(effitrain_cli("check", f"run_dir={tmp_path / 'run'}", f"resume={tmp_path / 'nope'}"),
                   "does not exist")


def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path):
    torn = tmp_path / "run" / "checkpoints" / "step_00000010"
    torn.mkdir(parents=True)
    assert_refused(effitrain_cli("check", f"run_dir={tmp_path / 'run'}", f"resume={torn}"), "not a complete checkpoint")


def test_resume_with_a_changed_model_shape_is_refused_before_anything_is_built(tmp_path):
    run = mark_run(tmp_path / "run", composed())
    before = snapshot(run)
    assert_refused(effitrain_cli("check", f"run_dir={run}", *TINY, "resume=auto", "model.hidden_size=96"),
                   "model.hidden_size: 64 -> 96 cannot change when a run resumes")
    assert_refused(effitrain_cli("check", "resume", str(run), "optimizer.lr=1"),
                   "optimizer.lr: 0.003 -> 1 cannot change when a run resumes")
    assert snapshot(run) == before


def test_resume_with_a_stages_override_compares_the_list_itself(tmp_path):
    """`+stages=[...]` given again with resume=auto is the run's own list (stored nested, as its keys are walked
    by index): it resumes; another list is refused, naming it."""
    stages = "+stages=[{name: a}, {name: b, optimizer: {lr: 0.001}}]"
    run = mark_run(tmp_path / "run", composed(stages))
    same = effitrain_cli("check", f"run_dir={run}", *TINY, stages, "resume=auto")
    assert same.returncode == 0 and "resuming" in same.stdout, same.stderr
    other = stages.replace("lr: 0.001", "lr: 0.002")
    assert_refused(effitrain_cli("check", f"run_dir={run}", *TINY, other, "resume=auto"),
                   "stages: [{'name': 'a'", "cannot change when a run resumes")


def test_resume_remembers_the_runs_recipe(tmp_path):
    run = mark_run(tmp_path / "run", composed("+recipe=galore"))
    for args in (["check", f"run_dir={run}", "resume=auto"], ["check", "resume", str(run), "train.max_steps=9"]):
        result = effitrain_cli(*args)
        assert result.returncode == 0 and "resuming" in result.stdout, result.stderr


def test_resume_with_a_different_recipe_names_what_differs(tmp_path):
    run = mark_run(tmp_path / "run", composed("+recipe=galore"))
    result = effitrain_cli("check", f"run_dir={run}", *TINY, "+recipe=apollo", "resume=auto")
    assert_refused(result, "the run's recipe is 'galore' and this launch's is 'apollo'",
                   "differs from the run's in optimizer.name: 'galore' -> 'apollo'", "effitrain resume")
    listed = result.stderr.split("differs from the run's in ")[1].split("; resume with")[0]
    assert "recipe." not in listed   # the recipe's name, paper and claim are its description, not settings
    assert_refused(effitrain_cli("check", "resume", str(run), "+recipe=apollo"),
                   "recipe: 'galore' -> 'apollo' cannot change")
    assert_refused(effitrain_cli("check", "resume", str(run), "optimizer=adamw"),
                   "optimizer: 'galore' -> 'adamw' cannot change")


def test_a_recipe_whose_description_changed_still_resumes_and_another_recipe_is_named(tmp_path):
    """A recipe file whose paper or claim text was edited since the run started computes the same run; another
    recipe with the very same settings is still another run, and is named as such."""
    from effitrain.config.resume import check_resume_config
    from effitrain.registry import ConfigError

    stored = composed("+recipe=galore")
    run = mark_run(tmp_path / "run", stored)
    edited = {**stored, "recipe": {**stored["recipe"], "claim": "reworded", "notes": "more notes"}}
    check_resume_config(run, edited, "auto", [edited["recipe"]])
    renamed = {**stored, "recipe": {**stored["recipe"], "name": "my_galore"}}
    with pytest.raises(ConfigError, match="the run's recipe is 'galore' and this launch's is 'my_galore'; no setting "
                                          "differs"):
        check_resume_config(run, renamed, "auto", [renamed["recipe"]])


def test_paths_are_compared_resolved_on_resume(tmp_path, monkeypatch):
    """A pipeline started as run_dir=outputs/r2 stored its stage's model path absolute (Hydra gives the task an
    absolute folder); `effitrain resume outputs/r2` from the same folder spells it relative: the same path."""
    from effitrain.config.resume import check_resume_config
    from effitrain.registry import ConfigError

    monkeypatch.chdir(tmp_path)
    stored = composed()
    stored["model"] = {"name": "pretrained", "path": str(tmp_path / "outputs/r2/stages/01-sft/final_model")}
    run = mark_run(tmp_path / "run", stored)
    relative = {**stored, "model": {**stored["model"], "path": "outputs/r2/stages/01-sft/final_model"}}
    check_resume_config(run, relative, "auto")
    dotted = {**stored, "model": {**stored["model"], "path": "./outputs/r2/stages/../stages/01-sft/final_model"}}
    check_resume_config(run, dotted, "auto")
    other = {**stored, "model": {**stored["model"], "path": "outputs/r3/stages/01-sft/final_model"}}
    with pytest.raises(ConfigError, match="model.path: .* -> 'outputs/r3/stages/01-sft/final_model'"):
        check_resume_config(run, other, "auto")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, train_in_process):
    run = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(["train.max_steps=2"], run)
    return run


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished_run):
    """Exit 0, not 2: the request is valid and the run is already where it was asked to get, so a script or a
    requeue loop that resumes until done ends there, instead of seeing a refusal."""
    before = snapshot(finished_run)
    # the verb, its spelling as overrides, and a launch that names a block option (composed, then Hydra's run)
    for args in (["resume", str(finished_run)], [f"run_dir={finished_run}", "resume=auto"],
                 [*TINY, "train.max_steps=2", "optimizer=adamw", f"run_dir={finished_run}", "resume=auto"]):
        result = effitrain_cli(*args)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == (f"resume: {finished_run} finished at step 2 (train.max_steps"
                                                          f"=2); nothing was changed; give a larger train.max_steps to "
                                                          f"train it further"), result.stdout
        assert "resumed from" not in result.stdout and "Traceback" not in result.stderr
        assert snapshot(finished_run) == before
    result = effitrain_cli("check", "resume", str(finished_run))
    assert result.returncode == 0 and "finished at step 2" in result.stdout


@pytest.mark.slow
def test_resume_with_a_horizon_below_the_runs_step_is_refused(finished_run):
    before = snapshot(finished_run)
    expected = "train.max_steps=1 is below step 2, where the run's newest checkpoint is"
    assert_refused(effitrain_cli("resume", str(finished_run), "train.max_steps=1"), expected, "step_00000002")
    assert_refused(effitrain_cli(f"run_dir={finished_run}", "resume=auto", "train.max_steps=1"), expected)
    assert_refused(effitrain_cli("check", "resume", str(finished_run), "train.max_steps=1"), expected)
    assert snapshot(finished_run) == before


def test_resume_of_a_folder_that_holds_no_run_is_refused(tmp_path):
    assert_refused(effitrain_cli("resume", str(tmp_path / "nothing")), "holds no effitrain run")


def test_resume_may_change_the_horizon_and_the_logging(tmp_path):
    run = mark_run(tmp_path / "run", composed())
    result = effitrain_cli("check", f"run_dir={run}", *TINY, "resume=auto", "train.max_steps=50",
                           "train.log_every=5", "train.save_every=5")
    assert result.returncode == 0, result.stderr


def test_resume_of_a_run_whose_config_is_not_yaml_is_refused(tmp_path):
    run = mark_run(tmp_path / "run")
    (run / "config.yaml").write_text("model: {name: [unclosed\n")
    assert_refused(effitrain_cli("check", f"run_dir={run}", *TINY, "resume=auto"), "is not valid YAML")


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_run_dir_on_a_read_only_file_system_is_refused(tmp_path):
    ro = tmp_path / "ro"
    if not _mount(ro, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root and mount)")
    try:
        assert_refused(effitrain_cli("check", f"run_dir={ro / 'run'}"), "is not writable")
        assert_refused(effitrain_cli(f"run_dir={ro / 'run'}", *TINY), "is not writable")
    finally:
        _umount(ro)


# ------------------------------------------------------------------------------------------------ launches
@pytest.mark.slow
def test_two_launches_on_one_new_run_dir_one_runs_the_other_is_refused(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "effitrain.cli", *TINY, "train.max_steps=30", f"run_dir={run}"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(c, e[-1500:]) for c, _, e in results]
    refused = next(err for code, _, err in results if code == 2)
    assert re.search(r"in use by a live run|already holds a run", refused) and "Traceback" not in refused
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 31))   # one run's log, not two interleaved


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run_only_once_the_new_one_has_started(tmp_path, train_in_process):
    run = tmp_path / "run"
    train_in_process(["train.max_steps=2"], run)
    old_checkpoint = run / "checkpoints" / "step_00000002"
    assert old_checkpoint.is_dir()
    train_in_process(["train.max_steps=3", "overwrite=true"], run)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert not old_checkpoint.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]   # the old run was removed, not left beside it


@pytest.mark.slow
def test_overwrite_that_fails_before_its_first_step_puts_the_old_run_back(tmp_path, train_in_process, monkeypatch):
    run = tmp_path / "run"
    train_in_process(["train.max_steps=2"], run)
    before = snapshot(run)

    from effitrain.engine import loop

    def fail(self, *args, **kwargs):
        raise RuntimeError("injected failure before the first step")

    monkeypatch.setattr(loop.Trainer, "_fit", fail)
    with pytest.raises(RuntimeError, match="injected"):
        train_in_process(["train.max_steps=3", "overwrite=true"], run)
    assert snapshot(run) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.slow
def test_a_launch_refused_after_the_preflight_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    result = effitrain_cli(*TINY, "train.micro_batch_size=100000", f"run_dir={run}")
    assert_refused(result, "fewer than one global batch")
    assert not run.exists()


# ------------------------------------------------------------------------------------------------ exits
@pytest.mark.slow
def test_an_internal_error_keeps_its_traceback_and_says_where_to_report_it(tmp_path):
    # a user's plugin whose model builder has a bug: not bad input, so not a one-line refusal
    (tmp_path / "broken_model_plugin.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from effitrain.config.blocks.model import LlamaParams
        from effitrain.registry import register

        @register("model", "broken", builder="broken_model_plugin:build")
        @dataclass
        class BrokenParams(LlamaParams):
            pass

        def build(params, tokenizer=None):
            raise ZeroDivisionError("a bug inside a model builder")
    """))
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = effitrain_cli(*TINY, "plugins=[broken_model_plugin]", "model.name=broken",
                           f"run_dir={tmp_path / 'run'}", env={"PYTHONPATH": path})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug inside a model builder" in result.stderr
    assert "this is a bug in effitrain" in result.stderr


@pytest.mark.slow
def test_a_diverged_run_exits_3_and_does_not_suggest_resuming(tmp_path):
    run = tmp_path / "run"
    result = effitrain_cli(*TINY, "optimizer.lr=1e30", "train.clip_grad_norm=0", "train.max_steps=20",
                           "train.max_bad_steps=3", f"run_dir={run}")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "resume=auto" not in result.stdout + result.stderr
    assert "3 non-finite steps in a row" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is False and summary["exit_code"] == 3


def test_a_ctrl_c_that_lands_while_the_first_ones_message_is_written_quits(monkeypatch):
    """Python may run a second signal's handler inside the first one, between any two bytecodes: a second Ctrl-C
    during the first one's message must already count as the second (CI once saw it taken as another first)."""
    from effitrain.engine import loop

    stop = loop.StopSignal()

    def message_interrupted_by_a_second_ctrl_c(*args, **kwargs):
        stop._handle(signal.SIGINT, None)

    monkeypatch.setattr(loop, "say_from_signal_handler", message_interrupted_by_a_second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_sigterm_then_ctrl_c_still_saves_first():
    from effitrain.engine import loop

    stop = loop.StopSignal()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGINT, None)   # the first Ctrl-C: says it will save, does not quit
    assert stop.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


@pytest.mark.slow
def test_a_second_ctrl_c_quits_at_once_without_saving(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *TINY, "train.max_steps=100000",
                             f"run_dir={run}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and '"loss"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    # the second Ctrl-C once the first one has been seen (two signals in one C call would arrive as one)
    first = proc.stderr.readline()
    assert "Ctrl-C: saving a checkpoint" in first, first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (first + err)[-2000:]
    assert "interrupted without saving" in err and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is False and "Ctrl-C" in summary["stopped_by"]


# ------------------------------------------------------------------------------------------------ console
_OWN_LINE = re.compile(r"^(effitrain: \S+ \(model=\S+, \d+ (steps|stages)\) in .*; starting \.\.\.$|step \d+: |"
                       r"building |starting the DeepSpeed engine|resumed from |resume=auto: |"
                       r"warning: checkpoint |finished: \d+ steps, .*; curves and table: effitrain report )")


@pytest.mark.slow
def test_a_normal_run_prints_only_effitrains_own_lines(tmp_path):
    run = tmp_path / "run"
    result = effitrain_cli(*TINY, "train.max_steps=3", f"run_dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
    assert lines and all(_OWN_LINE.match(l) for l in lines), [l for l in lines if not _OWN_LINE.match(l)]
    assert lines[0].startswith("effitrain: default (model=llama, 3 steps) in ")  # at once, before torch loads
    assert (run / "third_party.log").is_file()   # what the libraries printed is kept, not thrown away
    assert lines[-1].startswith("finished: 3 steps, ") and lines[-1].endswith(f"effitrain report {run}")

    verbose = effitrain_cli("--verbose", *TINY, "train.max_steps=3", f"run_dir={tmp_path / 'loud'}")
    assert verbose.returncode == 0
    assert not (tmp_path / "loud" / "third_party.log").exists()


# ------------------------------------------------------------------------------------------------ full disk
@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_how_much_space_is_needed(tmp_path):
    disk = tmp_path / "disk"
    if not _mount(disk, "size=3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    try:
        run = disk / "run"
        result = effitrain_cli(*TINY, "train.max_steps=40", "train.save_every=2", "train.keep_checkpoints=5",
                               "train.save_final_model=false", f"run_dir={run}")
        err = result.stderr.strip()
        assert result.returncode == 1, err[-2000:]
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert re.search(r"disk under .* is full while saving step \d+ \([\d.]+ MiB free, a checkpoint needs about "
                         r"[\d.]+ MiB\); the previous checkpoints are intact", err), err
        from effitrain.engine.checkpoint import verify_checkpoint
        from effitrain.run_layout import complete_checkpoints
        saved = complete_checkpoints(run / "checkpoints")
        assert saved, "not even the first checkpoint fitted: make the disk bigger"
        for _, path in saved:
            verify_checkpoint(path)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["finished"] is False and "full" in summary["failed"]
    finally:
        _umount(disk)


# ------------------------------------------------------------------------------------------------ damaged checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:   # same size: only the checksum can tell
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model states truncated": ("ds/mp_rank_00_model_states.pt", _truncate),
    "model states bit flip": ("ds/mp_rank_00_model_states.pt", _flip_a_byte),
    "optimizer states missing": ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", Path.unlink),
    "optimizer states empty": ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", lambda p: p.write_bytes(b"")),
    "loop state missing": ("state.pt", Path.unlink),
    "loop state empty": ("state.pt", lambda p: p.write_bytes(b"")),
    "rng state truncated": ("rank0.pt", _truncate),
    "metadata unreadable": ("meta.json", lambda p: p.write_text("{\"step\": 2")),
    "metadata missing": ("meta.json", Path.unlink),
}
_DAMAGED_RUN = [*TINY, "parallelism=zero1", "train.max_steps=24", "train.save_every=8", "train.keep_checkpoints=3",
                "train.eval_every=8", "optimizer.lr=3e-3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_in_process):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_in_process(_DAMAGED_RUN[len(TINY):], run)
    return run


def _losses(run: Path) -> dict:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {(l["step"], k): l[k] for l in lines for k in ("loss", "eval_loss") if k in l}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(kind, uninterrupted, tmp_path,
                                                                     train_in_process, capsys):
    """A run stopped after its step-16 checkpoint, which then got damaged: resume=auto reports it in one line,
    resumes from step 8, and logs exactly the losses of the run that was never interrupted."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "checkpoints" / "step_00000024")
    rel, damage = DAMAGE[kind]
    damage(run / "checkpoints" / "step_00000016" / rel)
    capsys.readouterr()

    summary = train_in_process([*_DAMAGED_RUN[len(TINY):], "resume=auto"], run)

    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning: checkpoint step_00000016")]
    assert len(warnings) == 1, out
    assert "resumed from" in out and "step_00000008 at step 8" in out
    assert summary["finished"] and summary["steps"] == 24
    expected, resumed = _losses(uninterrupted), _losses(run)
    later = [key for key in expected if key[0] > 8]
    assert len(later) >= 16 and set(resumed) == set(expected)
    for key in later:
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
