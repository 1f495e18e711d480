"""The tool verbs on damaged input and onto existing files: export, evaluate, report, plan, diff, explain, --help.

Each answers with one line and a non-zero exit (or accepts the input and says what it did), and never overwrites or
deletes what the user wrote (``snapshot`` compares folders before and after).  Most cases run ``effitrain.cli.main``
in this process without a model: a fabricated checkpoint folder is enough for the refusals that come before any
model is built.  The export cases that need real weights share two tiny trained runs and are marked ``slow``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from effitrain.cli import VERBS, main as cli_main
from effitrain.registry import ConfigError
from test_reliability_inputs import assert_one_line_error, snapshot

LOOP_WORDS = "is a symlink loop"


def run_cli(args: list[str], capfd) -> tuple[int, str, str]:
    """``effitrain ARGS`` in this process; capfd, since export and evaluate print through the console's own fds."""
    capfd.readouterr()
    code = cli_main(args)
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def symlink_loop(folder: Path, name: str = "loop") -> Path:
    a, b = folder / name, folder / f"{name}-back"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    return a


def fake_checkpoint(root: Path) -> Path:
    """A folder that passes for a checkpoint (its COMPLETE marker): enough for the refusals of the target, which
    come before the checkpoint is read."""
    ckpt = root / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("ok\n")
    return ckpt


# ------------------------------------------------------------------------------------------------ --help, explain
def test_help_lists_every_verb(capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    missing = [verb for verb in VERBS if f"effitrain {verb}" not in text]
    assert not missing, f"--help does not list {missing}"


@pytest.mark.parametrize("args, meant", [
    (["optimizer.learning_rate"], "optimizer.lr"),            # an alias: no spelling is close ('name' was offered)
    (["dataset.max_seq_length"], "dataset.seq_len"),
    (["train.batch_size"], "train.micro_batch_size"),
    (["optimizer.lrr"], "optimizer.lr"),                      # a typo of the last segment
    (["optimzer.lr"], "optimizer.lr"),                        # a typo of the parent
    (["lora.r", "+recipe=lora"], "peft.r"),                   # the right name under another parent
])
def test_explain_suggests_the_key_that_was_meant(args, meant, capsys):
    code = cli_main(["explain", *args])
    err = capsys.readouterr().err
    assert_one_line_error(code, "", err, f"no key '{args[0]}'", f"(did you mean '{meant}'?)")


def test_check_suggests_an_aliased_parameter(capsys):
    code = cli_main(["check", "optimizer.learning_rate=1e-3"])
    err = capsys.readouterr().err
    assert_one_line_error(code, "", err, "optimizer.learning_rate: unknown key", "(did you mean 'lr'?)")


# ------------------------------------------------------------------------------------------------ diff
def _stored_run(folder: Path, **changes) -> Path:
    """A run directory as training leaves it: the resolved config.yaml and the command line."""
    from effitrain.config.compose import compose_config

    cfg = compose_config(["train.max_steps=3"]).cfg
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": str(folder)}, sort_keys=False))
    (folder / "command.txt").write_text(f"effitrain train.max_steps=3 run_dir={folder}\n")
    return folder


def test_diff_of_two_runs_compares_the_values_they_ran_with(tmp_path, capsys):
    # the same command line, but one run's config.yaml holds another learning rate (a resume that re-planned it,
    # a stage's propagated key, an edit): replaying the command lines found no difference
    a = _stored_run(tmp_path / "a")
    b = _stored_run(tmp_path / "b", optimizer__lr=0.01, train__max_steps=50)
    assert cli_main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"optimizer.lr: 0.003 [{a}/config.yaml] -> 0.01 [{b}/config.yaml]",
                                f"train.max_steps: 3 [{a}/config.yaml] -> 50 [{b}/config.yaml]"]
    assert cli_main(["diff", str(a), str(b), "optimizer.lr=0.1"]) == 0   # overrides apply to both sides
    assert "optimizer.lr" not in capsys.readouterr().out


def test_diff_of_a_run_against_a_recipe_uses_the_runs_values(tmp_path, capsys):
    run = _stored_run(tmp_path / "run", optimizer__lr=0.01)
    assert cli_main(["diff", str(run), "default"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"optimizer.lr: 0.01 [{run}/config.yaml] -> 0.003 [configs/optimizer/adamw.yaml (chosen by default)]" \
        in lines
    assert not any(line.startswith(("run_dir", "resume", "overwrite")) for line in lines)


@pytest.mark.parametrize("damage, expected", [
    ("optimizer: [unclosed", ["config.yaml is not valid YAML", "line 1"]),
    ("- a list\n", ["config.yaml holds a list, not a configuration mapping"]),
])
def test_diff_of_a_run_with_a_damaged_config_is_one_line(damage, expected, tmp_path, capsys):
    run = _stored_run(tmp_path / "run")
    (run / "config.yaml").write_text(damage)
    code = cli_main(["diff", str(run), "default"])
    assert_one_line_error(code, "", capsys.readouterr().err, "diff:", *expected)


# ------------------------------------------------------------------------------------------------ symlink loops
def _loop_cases(tmp: Path) -> dict[str, list[str]]:
    loop = symlink_loop(tmp)
    ckpt = fake_checkpoint(tmp)
    (tmp / "ok").mkdir()
    (tmp / "ok" / "metrics.jsonl").write_text('{"step": 1, "tokens": 4, "loss": 5.0}\n')
    return {
        "run_dir": ["check", f"run_dir={loop}"],
        "resume": ["resume", str(loop)],
        "data_file": ["check", "dataset=local", f"dataset.path={loop}"],
        "export_path": ["export", str(loop)],
        "export_out": ["export", str(ckpt), "--out", str(loop)],
        "evaluate_path": ["evaluate", str(loop)],
        "report_path": ["report", str(loop)],
        "report_out": ["report", str(tmp / "ok"), "--out", str(loop)],
        "plan_plot": ["plan", "--plot", str(symlink_loop(tmp, "plot.png"))],
        "diff_side": ["diff", str(loop), "default"],
    }


@pytest.mark.parametrize("case", ["run_dir", "resume", "data_file", "export_path", "export_out", "evaluate_path",
                                  "report_path", "report_out", "plan_plot", "diff_side"])
def test_a_symlink_loop_is_named_as_one(case, tmp_path, capfd):
    args = _loop_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    code, out, err = run_cli(args, capfd)
    assert_one_line_error(code, out, err, LOOP_WORDS, "loop")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ export targets
def test_export_onto_a_file_is_one_line(tmp_path, capfd):
    ckpt = fake_checkpoint(tmp_path)
    target = tmp_path / "model.bin"
    target.write_text("mine")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["export", str(ckpt), "--out", str(target)], capfd)
    assert_one_line_error(code, out, err, "--out", "model.bin' is a file")
    assert snapshot(tmp_path) == before


def test_export_never_writes_into_a_folder_of_user_files(tmp_path, capfd):
    ckpt = fake_checkpoint(tmp_path)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}')   # looks like a model folder, but effitrain did not make it
    (target / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["export", str(ckpt), "--out", str(target)], capfd)
    assert_one_line_error(code, out, err, "is not an earlier export", "config.json, notes.txt")
    assert snapshot(tmp_path) == before


def test_export_of_a_folder_that_holds_nothing_to_export_says_what_it_is(tmp_path, capfd):
    (tmp_path / "pipe" / "stages" / "01-a").mkdir(parents=True)
    (tmp_path / "pipe" / "stages" / "01-a" / "config.yaml").write_text("{}")
    code, out, err = run_cli(["export", str(tmp_path / "pipe")], capfd)
    assert_one_line_error(code, out, err, "is a multi-stage run", "none of its stages (01-a)",
                          "01-a/checkpoints/step_N")


# ------------------------------------------------------------------------------------------------ evaluate inputs
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A real save_pretrained folder (a 2-layer Llama and a word-level tokenizer), made without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(str(d) for d in range(10)), "+", "-", "="])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _damaged_copy(model: Path, tmp: Path, damage: str) -> Path:
    folder = tmp / damage
    shutil.copytree(model, folder)
    if damage == "no_model_type":  # architectures is still there, as in a hand-edited or converted config
        config = json.loads((folder / "config.json").read_text())
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "truncated_weights":  # a copy or a download cut short
        weights = folder / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "cut_header":
        os.truncate(folder / "model.safetensors", 5)
    elif damage == "unmerged_adapter":  # a prefix-tuning final model: its top level is the frozen base
        (folder / "adapter").mkdir()
        (folder / "effitrain_export.json").write_text(json.dumps(
            {"format": "huggingface", "adapter": "adapter", "merged": False, "peft_type": ["PREFIX_TUNING"]}))
    return folder


@pytest.mark.parametrize("damage, expected", [
    ("no_model_type", ["config.json' names no model_type", "add \"model_type\""]),
    ("truncated_weights", ["model.safetensors is truncated", "bytes of the", "its header describes"]),
    ("cut_header", ["model.safetensors is truncated or not a safetensors file"]),
    ("unmerged_adapter", ["the base model without its adapter", "PREFIX_TUNING"]),
])
def test_evaluate_of_a_damaged_model_folder_is_one_line(damage, expected, tiny_model, tmp_path, capfd):
    folder = _damaged_copy(tiny_model, tmp_path, damage)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["evaluate", str(folder), "eval.tasks=[demo_arithmetic]", "eval.limit=2"], capfd)
    assert_one_line_error(code, out, err, "evaluate:", *expected)
    assert snapshot(tmp_path) == before


def test_an_intact_model_folder_passes_evaluates_checks(tiny_model):
    from effitrain.evaluation import check_model_dir, load_model

    check_model_dir(tiny_model)
    model, tokenizer = load_model(tiny_model, "cpu")
    assert model.config.num_hidden_layers == 2 and tokenizer("1 + 2")["input_ids"]


# ------------------------------------------------------------------------------------------------ report
def _run_dir(path: Path, *, lr: float = 1e-3, losses=(6.0, 5.5, 5.0)) -> Path:
    path.mkdir(parents=True)
    lines = [{"step": i + 1, "tokens": 256 * (i + 1), "loss": loss, "lr": lr, "tokens_per_s": 1000.0}
             for i, loss in enumerate(losses)]
    lines.append({"step": len(losses), "tokens": 256 * len(losses), "eval_loss": losses[-1] + 0.2})
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (path / "summary.json").write_text(json.dumps({"finished": True, "steps": len(losses), "tokens": 768,
                                                   "final_eval_loss": losses[-1] + 0.2, "train_seconds": 3.0}))
    (path / "recipes.yaml").write_text(yaml.safe_dump([{"name": "baseline", "paper": "x"}]))
    (path / "command.txt").write_text(f"effitrain optimizer.lr={lr} run_dir={path}\n")
    return path


def _damage(run: Path, how: str) -> str:
    """Damage one file of ``run``; returns the file's name, which the warning must name."""
    if how == "scalar_line":
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write("3\n")
    elif how == "string_loss":
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write('{"step": 4, "tokens": 1024, "loss": "abc"}\n')
    elif how == "line_in_the_middle":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[1:]]) + "\n")
    elif how == "truncated_summary":
        (run / "summary.json").write_text((run / "summary.json").read_text()[:20])
    elif how == "list_summary":
        (run / "summary.json").write_text("[1, 2]")
    elif how == "string_steps_in_summary":
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "steps": "three"}))
    elif how == "broken_recipes_yaml":
        (run / "recipes.yaml").write_text("- name: [unclosed\n")
        return "recipes.yaml"
    return "summary.json" if "summary" in how else "metrics.jsonl"


@pytest.mark.parametrize("how", ["scalar_line", "string_loss", "line_in_the_middle", "truncated_summary",
                                 "list_summary", "string_steps_in_summary", "broken_recipes_yaml"])
def test_report_leaves_out_what_is_damaged_and_reports_the_rest(how, tmp_path, capfd):
    good = _run_dir(tmp_path / "good", lr=1e-3)
    bad = _run_dir(tmp_path / "bad", lr=3e-3)
    name = _damage(bad, how)
    code, out, err = run_cli(["report", str(good), str(bad), "--out", str(tmp_path / "rep")], capfd)
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("effitrain: warning: report: ") and "Traceback" not in err
    assert f"{bad / name}" in warnings[0]
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "optimizer.lr=0.001 |" in markdown and "optimizer.lr=0.003 |" in markdown   # both runs have their row
    assert "Left out (damaged):" in markdown and str(bad / name) in markdown
    assert (tmp_path / "rep" / "loss.png").is_file()


def test_report_of_a_sweep_with_a_truncated_manifest_reports_its_member_folders(tmp_path, capfd):
    root = tmp_path / "sweep"
    for k, lr in enumerate([1e-3, 3e-3]):
        _run_dir(root / str(k), lr=lr)
    (root / "sweep.json").write_text('{"members": [{"dir": "0", "overrides": ["optimizer.lr=0.001"]}, {"di')
    code, out, err = run_cli(["report", str(root)], capfd)
    assert code == 0, err
    assert "sweep.json: damaged" in err and "the 2 run(s) in its numbered subfolders" in err
    page = (root / "report" / "report.md").read_text()
    assert "baseline optimizer.lr=0.001" in page and "baseline optimizer.lr=0.003" in page


def test_report_onto_a_file_is_one_line(tmp_path, capfd):
    run = _run_dir(tmp_path / "run")
    (tmp_path / "out.html").write_text("mine")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["report", str(run), "--out", str(tmp_path / "out.html")], capfd)
    assert_one_line_error(code, out, err, "--out", "out.html' is a file")
    assert snapshot(tmp_path) == before


def test_report_never_overwrites_a_folder_it_did_not_write(tmp_path, capfd):
    run = _run_dir(tmp_path / "run")
    mine = tmp_path / "paper"
    mine.mkdir()
    (mine / "report.md").write_text("# my own report\n")
    (mine / "loss.png").write_bytes(b"my figure")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["report", str(run), "--out", str(mine)], capfd)
    assert_one_line_error(code, out, err, "is not an earlier effitrain report", "loss.png, report.md")
    assert snapshot(tmp_path) == before


def test_report_replaces_an_earlier_report_and_keeps_other_files_beside_it(tmp_path, capfd):
    run = _run_dir(tmp_path / "run")
    out_dir = tmp_path / "rep"
    assert run_cli(["report", str(run), "--out", str(out_dir), "--title", "first"], capfd)[0] == 0
    (out_dir / "notes.txt").write_text("added by hand")
    code, out, err = run_cli(["report", str(run), "--out", str(out_dir), "--title", "second"], capfd)
    assert code == 0, err
    assert (out_dir / "report.md").read_text().startswith("# second")
    assert (out_dir / "notes.txt").read_text() == "added by hand"


# ------------------------------------------------------------------------------------------------ plan
def test_plan_plot_into_a_missing_folder_makes_it(tmp_path, capsys):
    target = tmp_path / "figures" / "june" / "plan.png"
    assert cli_main(["plan", "train.max_steps=20", "--plot", str(target)]) == 0
    assert target.read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out.strip().endswith(f"wrote {target}")


@pytest.mark.parametrize("where, expected", [("a_file/plan.png", "which is a file"),
                                             ("folder.png", "is a folder")])
def test_plan_plot_onto_a_bad_path_is_one_line_before_the_plan(where, expected, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    before = snapshot(tmp_path)
    code = cli_main(["plan", "--plot", str(tmp_path / where)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, "plan: --plot", expected)
    assert captured.out == ""   # refused before the table is printed
    assert snapshot(tmp_path) == before


def test_plan_plot_shows_every_stages_learning_rate():
    from effitrain.config.compose import compose_config
    from effitrain.plan import plan_figure, plan_sections

    composed = compose_config(["+recipe=tulu3"])
    sections = plan_sections(composed.cfg, composed.recipes)
    peaks = [max(s.value_at("lr", k) for k in range(s.max_steps)) for s in sections]
    assert peaks == pytest.approx([3e-3, 3e-4, 3e-5])   # sft, dpo, rlvr: the axis must hold all three
    fig = plan_figure(sections)
    bottom, top = fig.axes[0].get_ylim()
    assert all(bottom < peak < top for peak in peaks), (bottom, top, peaks)
    # each stage's curve takes a visible share of the panel: on the linear axis rlvr's was 1% of its height
    assert fig.axes[0].get_yscale() == "log"


def test_plan_describes_what_a_preference_and_a_grpo_step_train_on():
    from effitrain.config.compose import compose_config
    from effitrain.plan import format_section, plan_sections

    composed = compose_config(["+recipe=tulu3"])
    headers = [format_section(s).splitlines()[0] for s in plan_sections(composed.cfg, composed.recipes)]
    assert headers[0].endswith("(world size 1, packed rows of 128 tokens)")
    assert "8 preference pairs per step: chosen and rejected each a row of up to 128 tokens" in headers[1]
    assert "packed rows" not in headers[1] and "packed rows" not in headers[2]
    assert "8 prompts per step, each answered 8 times: 64 sampled completions of up to 8 new tokens" in headers[2]


# ------------------------------------------------------------------------------------------------ real exports
@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_in_process) -> dict[str, Path]:
    """Two tiny runs with a checkpoint at their last step: a plain model and a LoRA adapter."""
    root = tmp_path_factory.mktemp("trained")
    runs = {"plain": root / "plain", "lora": root / "lora"}
    train_in_process(["train.max_steps=2", "train.save_every=2"], runs["plain"])
    train_in_process(["+recipe=lora", "train.max_steps=2", "train.save_every=2"], runs["lora"])
    return runs


def _copy(run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(run, tmp / run.name, symlinks=True))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".export-" in p.name or ".replaced-" in p.name)


@pytest.mark.slow
def test_export_of_a_run_with_a_damaged_tokenizer_is_one_line(trained, tmp_path, capfd):
    run = _copy(trained["plain"], tmp_path)
    (run / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    before = snapshot(tmp_path)
    code, out, err = run_cli(["export", str(run), "--out", str(tmp_path / "out")], capfd)
    assert_one_line_error(code, out, err, "tokenizer/tokenizer.json is not valid JSON", "line 1, column")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_export_of_a_run_whose_config_no_longer_fits_its_checkpoint_is_one_line(trained, tmp_path, capfd):
    run = _copy(trained["plain"], tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["hidden_size"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, out, err = run_cli(["export", str(run), "--out", str(tmp_path / "out")], capfd)
    assert_one_line_error(code, out, err, "does not fit the model", "config.yaml", "[512, 64] in the checkpoint",
                          "[512, 32]")
    assert not (tmp_path / "out").exists()


def _write_then(action):
    """A stand-in for safetensors' writer that writes part of the file, then does ``action``."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)
        action()
    return save_file


@pytest.mark.slow
def test_export_onto_a_full_disk_leaves_nothing_and_is_one_line(trained, tmp_path, capfd, monkeypatch):
    import transformers.modeling_utils

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _write_then(disk_full))
    before = snapshot(trained["plain"])
    code, out, err = run_cli(["export", str(trained["plain"]), "--out", str(tmp_path / "out")], capfd)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "is full" in lines[0] and "nothing was written to" in lines[0]
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert snapshot(trained["plain"]) == before


@pytest.mark.slow
def test_sigterm_during_export_leaves_no_partial_folder(trained, tmp_path, capfd, monkeypatch):
    import transformers.modeling_utils

    earlier = tmp_path / "out"   # an earlier export: it must survive an interrupted replacement whole
    assert run_cli(["export", str(trained["plain"]), "--out", str(earlier)], capfd)[0] == 0
    before = snapshot(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        _write_then(lambda: os.kill(os.getpid(), signal.SIGTERM)))
    code, out, err = run_cli(["export", str(trained["plain"]), "--out", str(earlier)], capfd)
    assert code == 130, err
    assert err.strip() == "effitrain: export interrupted (SIGTERM); nothing was written"
    assert snapshot(tmp_path) == before and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == handler


@pytest.mark.slow
def test_two_exports_into_one_folder_do_not_both_succeed(trained, tmp_path, monkeypatch):
    import effitrain.export as export

    out = tmp_path / "shared"
    both_ready = threading.Barrier(2, timeout=300)
    commit = export.commit

    def commit_together(tmp, target, seen):
        both_ready.wait()  # both have checked the target and written their model: the race, every time
        return commit(tmp, target, seen)

    monkeypatch.setattr(export, "commit", commit_together)
    results: dict[str, object] = {}

    def run(name: str, merge: bool) -> None:
        try:
            results[name] = export.export_checkpoint(trained["lora"], out, merge_adapters=merge)
        except ConfigError as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=("merged", True)), threading.Thread(target=run, args=("apart", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [name for name, r in results.items() if r == out]
    lost = [r for r in results.values() if isinstance(r, ConfigError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "was written by another export while this export ran; nothing was replaced" in str(lost[0])
    # the folder is the winner's alone: the merged export has no adapter/, the other has one
    assert (out / "adapter").is_dir() == (won == ["apart"])
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_export_replaces_an_earlier_export_and_clears_a_killed_ones_staging(trained, tmp_path, capfd):
    out = tmp_path / "model"
    assert run_cli(["export", str(trained["plain"]), "--out", str(out)], capfd)[0] == 0
    first = json.loads((out / ".effitrain-export").read_text())["id"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / ".model.export-1-1"   # what a SIGKILLed export leaves: its marker names a dead process
    killed.mkdir()
    (killed / ".effitrain-staging").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    alive = tmp_path / ".model.export-2-2"    # a live export's staging folder is never touched
    alive.mkdir()
    (alive / ".effitrain-staging").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    code, out_text, err = run_cli(["export", str(trained["plain"]), "--out", str(out)], capfd)
    assert code == 0, err
    assert json.loads((out / ".effitrain-export").read_text())["id"] != first
    assert _leftovers(tmp_path) == [alive.name]


@pytest.mark.slow
def test_merge_adapters_writes_only_the_merged_model_and_the_adapter_export_is_portable(trained, tmp_path, capfd):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged, apart = tmp_path / "merged", tmp_path / "apart"
    assert run_cli(["export", str(trained["lora"]), "--out", str(merged), "--merge-adapters"], capfd)[0] == 0
    assert run_cli(["export", str(trained["lora"]), "--out", str(apart)], capfd)[0] == 0
    assert not (merged / "adapter").exists()
    assert json.loads((apart / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == ".."
    assert 'PeftModel.from_pretrained(base, "THIS_FOLDER/adapter")' in (apart / "README.md").read_text()
    moved = Path(shutil.move(str(apart), tmp_path / "elsewhere" / "moved"))   # the pair travels together
    probe = torch.arange(16).reshape(1, 16) % 200 + 3
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=probe).logits
        pair = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved), moved / "adapter").eval()
        assert torch.allclose(pair(input_ids=probe).logits, want, atol=1e-5)


@pytest.mark.slow
def test_export_and_evaluate_accept_a_multi_stage_run(trained, tmp_path, capfd):
    pipe = tmp_path / "pipe"   # the layout a pipeline writes: RUN/stages/NN-NAME/, each a whole run
    for stage in ("01-sft", "02-dpo"):
        shutil.copytree(trained["plain"], pipe / "stages" / stage)
    (pipe / "config.yaml").write_text("{}")
    code, out, err = run_cli(["export", str(pipe), "--out", str(tmp_path / "last")], capfd)
    assert code == 0, err
    assert f"exporting {pipe}/stages/02-dpo/checkpoints/step_00000002 (the last stage" in out
    assert (tmp_path / "last" / "model.safetensors").is_file()

    shutil.rmtree(pipe / "stages" / "02-dpo" / "checkpoints")   # a stage that kept only its final model
    code, out, err = run_cli(["export", str(pipe), "--out", str(tmp_path / "final")], capfd)
    assert code == 0, err
    assert "02-dpo, its final_model (the run kept no checkpoint)" in out
    code, out, err = run_cli(["evaluate", str(pipe), "eval.tasks=[demo_arithmetic]", "eval.limit=2"], capfd)
    assert code == 0, err
    assert f"evaluating {pipe}/stages/02-dpo/final_model" in out and '"demo_arithmetic"' in out
