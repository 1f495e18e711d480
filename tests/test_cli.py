"""The command line: bad input is one readable line with exit status 2, and the tool verbs stay torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, effitrain_cli
from effitrain.config.compose import compose_config
from effitrain.config.tree import group_options, groups
from effitrain.config.spec import validate
from effitrain.registry import ConfigError


@pytest.mark.parametrize("args, expected", [
    (["optimizer.lrr=1"], "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    (["+recipe=wds"], "recipe: unknown recipe 'wds' (did you mean 'wsd'?)"),
    (["optimizer.lr=abc"], "optimizer.lr: expected a number, got 'abc'"),
    (["model=nope"], "model: unknown model option 'nope'"),
    (["trian.max_steps=3"], "trian: unknown key (did you mean 'train'?)"),
    (["train.max_steps=0"], "train.max_steps: 0 is out of range, it must be >= 1"),
    (["+recipe=[wsd,cpt_rewarm]"], "recipe: 'wsd' and 'cpt_rewarm' both set 'scheduler'"),
    (["parallelism.stage=7"], "parallelism.stage: 7 is out of range, it must be <= 3"),
    (["train.max_steps=[1"], "cannot parse overrides"),
])
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    result = effitrain_cli(*args, f"run_dir={run_dir}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"effitrain: error: {expected}"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()


# options whose YAML leaves an input for the user to give (validated as a string here, loaded only at launch)
# (selection options need none: without a reference model they train a proxy on the pool)
REQUIRED_INPUTS = {"model/pretrained": "model.path", "dataset/local": "dataset.path", "dataset/hub": "dataset.path",
                   "objective/distill": "objective.teacher", "dataset/chat_local": "dataset.path",
                   "dataset/chat_hub": "dataset.path"}
# options that follow a timeline quantity, which must then be declared
REQUIRED_TIMELINE = {"curriculum/mixture": "+timeline.mixture={unit: step, points: [{at: 0, value: {code: 1.0}}]}",
                     "scheduler/timeline": "+timeline.lr={unit: step, points: [{at: 0, value: 1.0}]}",
                     "curriculum/meco": "+timeline.phases={unit: fraction, intervals: {cooldown: [0.9, 1.0]}}",
                     "curriculum/difficulty": "+timeline.competence={pacing: {function: linear, start: 0.1, until: 0.5}}"}
# options that read data packed their own way, or schedule named phases, which must then be given
REQUIRED_CONTEXT = {"curriculum/dataset_decomposition": ["dataset.packing=decompose"],
                    "curriculum/seta": ["objective=weighted_causal_lm"],
                    "peft/structured_ffn": ["+methods.self_guided={}"],
                    "peft/sparse_spectral": ["+methods.sparse_spectral={}"],
                    "peft/tri_adapt_lora": ["+methods.tri_adapt_lora={}"],
                    "curriculum/domain_phases": ["+curriculum.phases.warm=[code]",
                                                 "+timeline.phases={unit: fraction, intervals: {warm: [0, 0.5]}}"],
                    # post-training objectives read conversations (sft), pairs (dpo, simpo) or prompts (grpo)
                    "objective/sft": ["dataset=chat_demo"],
                    "objective/dpo": ["dataset=chat_demo", "dataset.format=preference"],
                    "objective/simpo": ["dataset=chat_demo", "dataset.format=preference"],
                    "objective/grpo": ["dataset=chat_demo", "dataset.format=prompts"],
                    "objective/lssd": ["dataset=chat_demo"],
                    "objective/sami": ["dataset=chat_demo", "dataset.format=prompts"],
                    # dump draws GRPO prompts by distribution: the arithmetic split into several
                    "curriculum/dump": ["objective=grpo", "dataset=chat_demo", "dataset.format=prompts",
                                        "+dataset.domain_by=operation"],
                    # a mixed objective names its components: grpo on the stage's prompts, sft on a stream of its own
                    "objective/mixed": ["dataset=chat_demo", "dataset.format=prompts",
                                        "+objective.components.rl={objective:grpo,data:stage}",
                                        "+objective.components.sft={objective:sft,data:{format:chat}}"]}


def test_every_option_of_every_group_validates():
    from effitrain.config.blocks.peft_qlora import cuda_device_visible

    for group in groups():
        if group == "recipe":
            continue
        for option in group_options(group):
            overrides = [f"{group}={option}"]
            if f"{group}/{option}" in REQUIRED_INPUTS:
                overrides.append(f"{REQUIRED_INPUTS[group + '/' + option]}=somewhere")
            if f"{group}/{option}" in REQUIRED_TIMELINE:
                overrides.append(REQUIRED_TIMELINE[f"{group}/{option}"])
            overrides += REQUIRED_CONTEXT.get(f"{group}/{option}", [])
            composed = compose_config(overrides)
            if f"{group}/{option}" == "peft/qlora" and not cuda_device_visible():
                # bitsandbytes' 4-bit weights: validation on a machine without a GPU refuses it (tests/test_qlora.py)
                with pytest.raises(ConfigError, match="qlora_needs_cuda"):
                    validate(composed.cfg)
                continue
            assert validate(composed.cfg).blocks[group].entry.group == group


def test_stacked_recipes_compose_when_they_do_not_overlap():
    composed = compose_config(["+recipe=[baseline]", "optimizer.lr=3e-3"])
    spec = validate(composed.cfg, composed.recipes)
    assert [r.name for r in spec.recipes] == ["baseline"]
    assert spec.blocks["optimizer"].params.lr == 3e-3


def test_recipe_must_be_added_not_assigned():
    with pytest.raises(ConfigError, match=r"add one with '\+recipe=wsd'"):
        compose_config(["recipe=wsd"])


def test_tool_verbs_import_neither_torch_nor_deepspeed():
    code = ("import sys; from effitrain.cli import main; "
            "codes = [main(['recipes']), main(['show', 'wsd']), main(['check', '+recipe=wsd']), main(['rules']), "
            "main(['diff', 'baseline', 'wsd']), main(['explain', 'optimizer.lr', '+recipe=galore']), "
            "main(['lock', '--check', 'wsd']), main(['plan', '+recipe=wsd'])]; "
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'datasets') if m in sys.modules]; "
            "print('HEAVY', heavy, codes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "HEAVY [] [0, 0, 0, 0, 0, 0, 0, 0]" in out.stdout, out.stdout + out.stderr


def test_a_verb_whose_reader_closes_the_pipe_ends_quietly():
    """`effitrain recipes | head -1`: the reader is gone before the table is written; no traceback, status 141 as
    a shell reports SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "effitrain.cli", "recipes"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()   # before the interpreter has even started: every write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_recipes_table_lists_every_recipe_with_its_paper():
    result = effitrain_cli("recipes")
    assert result.returncode == 0
    for name in group_options("recipe"):
        assert any(line.split()[0] == name for line in result.stdout.splitlines()[1:])
    assert "2404.06395" in result.stdout  # wsd's arXiv id


def test_show_prints_the_resolved_recipe_config():
    result = effitrain_cli("show", "wsd", "optimizer.lr=0.005")
    assert result.returncode == 0, result.stderr
    assert "name: wsd" in result.stdout and "decay_shape: exp" in result.stdout and "lr: 0.005" in result.stdout


def test_diff_names_the_keys_a_recipe_changes():
    result = effitrain_cli("diff", "baseline", "wsd")
    assert result.returncode == 0, result.stderr
    assert ("scheduler.name: 'cosine' [configs/scheduler/cosine.yaml (chosen by recipe baseline)] -> "
            "'wsd' [configs/scheduler/wsd.yaml (chosen by recipe wsd)]") in result.stdout


def test_check_refuses_an_existing_run_dir(tmp_path):
    (tmp_path / ".effitrain-run").write_text("{}\n")  # effitrain's own marker: this folder is a run
    result = effitrain_cli("check", f"run_dir={tmp_path}")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert effitrain_cli("check", f"run_dir={tmp_path}", "resume=auto").returncode == 0


def test_a_folder_with_a_stray_config_is_not_a_run_and_is_never_written_into(tmp_path):
    (tmp_path / "config.yaml").write_text("x: 1\n")
    for extra in ([], ["overwrite=true"], ["resume=auto"]):
        result = effitrain_cli("check", f"run_dir={tmp_path}", *extra)
        assert result.returncode == 2 and "is not an effitrain run" in result.stderr, extra
    assert (tmp_path / "config.yaml").read_text() == "x: 1\n"


def test_device_rules_refuse_fp16_on_a_cpu():
    from effitrain.config.rules import Environment, check_rules

    spec = validate(compose_config(["precision=fp16"]).cfg)
    check_rules(spec, Environment())  # device unknown (pre-flight): not refused yet
    with pytest.raises(ConfigError, match=r"\[fp16_needs_gpu\]: precision=fp16 needs a CUDA GPU.*use precision=bf16"):
        check_rules(spec, Environment(device_type="cpu", bf16_supported=True))
    check_rules(spec, Environment(device_type="cuda", bf16_supported=True))


def test_rules_table_lists_every_rule():
    result = effitrain_cli("rules")
    assert result.returncode == 0
    for name in ("fp16_needs_gpu", "galore_needs_2d_gradients", "lisa_needs_unsharded_state", "peft_zero3_saving"):
        assert name in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["+recipe=wsd,lisa"], "recipe: give recipes once, as '+recipe=[a,b]'"),
    (["+recipe=lisa", "+recipe=lora"], "recipe: give recipes once"),
    (["methods.lsia.interval=3"], "methods.lsia: method not configured (did you mean 'lisa'?)"),
    (["+recipe=lisa", "methods.lisa.intervl=3"],
     "methods.lisa.intervl: unknown key (did you mean 'interval'?); valid keys: active_layers, interval, layers_path"),
])
def test_recipe_and_method_mistakes_say_what_to_write(args, expected):
    with pytest.raises(ConfigError) as err:
        compose_config(args)
    assert str(err.value).startswith(expected)


def test_a_mapping_that_starts_empty_says_how_to_add_an_entry():
    with pytest.raises(ConfigError, match=r"^curriculum.phases.warm: curriculum.phases starts empty, so its entries "
                                          r"are added one by one: '\+curriculum.phases.warm=VALUE'$"):
        compose_config(["curriculum=domain_phases", "curriculum.phases={warm: [code]}"])
    composed = compose_config(["curriculum=domain_phases", "+curriculum.phases.warm=[code]"])
    assert composed.cfg["curriculum"]["phases"] == {"warm": ["code"]}
