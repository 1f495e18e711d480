"""Multi-stage recipes: a `stages:` list runs as one pipeline of complete runs.

What holds: every stage's config is validated before the first starts; the command line's overrides reach every
stage; a stage starts from exactly the weights the previous one ended with (through a transform where one is
declared: G_stack's stacked layers equal their sources); a pipeline killed during stage 2 resumes stage 2 and never
re-runs stage 1; the summary has one row per stage and the totals.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import TINY, effitrain_cli, sigkill_at
from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.registry import ConfigError

TWO_STAGES = "+stages=[{name: first, train: {max_steps: 4}}, {name: second, train: {max_steps: 6}}]"


def _validate(*overrides):
    composed = compose_config(list(overrides))
    return validate(composed.cfg, composed.recipes)


# ---------------------------------------------------------------------------------------------- configuration
def test_each_stage_is_validated_as_a_whole_run_config_with_its_delta():
    spec = _validate("+stages=[{name: small, model: {num_layers: 1}}, "
                     "{name: grown, transform: {name: stack_layers, factor: 4}, optimizer: {lr: 1e-4}}]")
    small, grown = spec.stage_specs
    assert [s.name for s in spec.stages] == ["small", "grown"]
    assert small.block("model").params.num_layers == 1 and small.block("optimizer").params.lr == 3e-3
    assert grown.block("model").name == "pretrained"           # init: previous is the default after stage 1
    assert grown.block("optimizer").params.lr == 1e-4
    assert spec.block("model").params.num_layers == 4          # the base (the recipe without stages) is untouched


def test_a_block_given_as_an_option_name_or_another_entry_replaces_the_block():
    spec = _validate("+stages=[{name: a}, {name: b, init: scratch, optimizer: galore}, "
                     "{name: c, init: scratch, scheduler: {name: constant}}]")
    assert spec.stage_specs[1].block("optimizer").name == "galore"
    assert spec.stage_specs[2].block("scheduler").name == "constant"


@pytest.mark.parametrize("stages, message", [
    ("[{name: a, init: previous}]", "stages.a.init: the first stage has no previous stage"),
    ("[{name: a}, {name: b, transform: {name: stack_layer}}]", "did you mean 'stack_layers'"),
    ("[{name: a}, {name: b, init: scratch, transform: {name: densify}}]", "init: scratch has no model to transform"),
    ("[{name: a}, {name: b, model: {num_layers: 8}}]", "stages.b.model: a stage with init: previous"),
    ("[{name: a}, {name: a}]", "'a' names two stages"),
    ("[{name: a, run_dir: x}]", "stages.a.run_dir: belongs to the whole pipeline"),
    ("[{name: a}, {name: b, optimizer: {lr: -1}}]", "stages.b: optimizer.lr: -1.0 is out of range"),
    ("[{name: a, optimizer: adamww}]", "unknown optimizer option 'adamww' (did you mean 'adamw'?)"),
    ("[{name: a, train: {max_steps: 2}}, {name: b, init: scratch, train: {note: '@stage:c'}}]",
     "'@stage:c' must name an earlier stage"),
    ("[]", "stages: expected a non-empty list"),
])
def test_bad_stages_are_one_line_errors_naming_the_stage(stages, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(f"+stages={stages}")


def test_command_line_overrides_reach_every_stage_and_a_stage_override_wins():
    composed = compose_config([TWO_STAGES, "train.max_steps=3", "stages.1.train.max_steps=5", "optimizer.lr=1e-3"])
    spec = validate(composed.cfg, composed.recipes)
    assert [s.train.max_steps for s in spec.stage_specs] == [3, 5]
    assert [s.block("optimizer").params.lr for s in spec.stage_specs] == [1e-3, 1e-3]


def test_a_key_a_stage_does_not_set_is_added_with_a_plus():
    with pytest.raises(ConfigError, match=re.escape("stages.0.train.save_every: the stage does not set this key yet; "
                                                    "add it with '+stages.0.train.save_every=VALUE'")):
        compose_config([TWO_STAGES, "stages.0.train.save_every=2"])
    composed = compose_config([TWO_STAGES, "+stages.0.train.save_every=2"])
    assert composed.cfg["stages"][0]["train"] == {"max_steps": 4, "save_every": 2}


def test_check_validates_every_stage_before_anything_runs(tmp_path):
    ok = effitrain_cli("check", "+recipe=g_stack", f"run_dir={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stderr
    assert "stages [small, stacked]" in ok.stdout
    bad = effitrain_cli("check", "+recipe=g_stack", "stages.1.transform.factor=1", f"run_dir={tmp_path / 'run'}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "stages.stacked.transform.factor: 1 is out of range" in bad.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- transforms
def _tiny_llama(layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _transform(name, source, **params):
    from effitrain.config.spec import parse_transform
    from effitrain.config.stages import StageDecl

    stage = StageDecl(2, "next", "previous", {"name": name, **params}, {})
    return parse_transform(stage).build(source)


def test_stack_layers_copies_each_trained_layer_into_its_stacked_positions(tmp_path):
    small = _tiny_llama(layers=2)
    small.save_pretrained(tmp_path / "small")
    grown, info = _transform("stack_layers", tmp_path / "small", factor=3)
    assert grown.config.num_hidden_layers == 6 and info["order"] == [0, 1, 0, 1, 0, 1]
    for i, source in enumerate(info["order"]):
        for (name, p), (_, q) in zip(grown.model.layers[i].state_dict().items(),
                                     small.model.layers[source].state_dict().items()):
            assert torch.equal(p, q), (i, name)
        assert grown.model.layers[i].self_attn.layer_idx == i   # the KV cache indexes the new positions
    assert torch.equal(grown.model.embed_tokens.weight, small.model.embed_tokens.weight)
    assert torch.equal(grown.model.norm.weight, small.model.norm.weight)
    assert torch.equal(grown.lm_head.weight, grown.model.embed_tokens.weight)   # still tied
    # the copies are independent parameters: training one position does not move another
    assert grown.model.layers[0].mlp.up_proj.weight.data_ptr() != grown.model.layers[2].mlp.up_proj.weight.data_ptr()

    explicit, _ = _transform("stack_layers", tmp_path / "small", order=[1, 1, 0])
    assert torch.equal(explicit.model.layers[2].mlp.up_proj.weight, small.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match="source layer 5 does not exist; the model has 2 layers"):
        _transform("stack_layers", tmp_path / "small", order=[0, 5])


def test_merge_adapters_folds_lora_into_the_base_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    from effitrain.peft.adapters import export_final_model

    base = _tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)   # a trained adapter: B is no longer zero
    export_final_model(model, None, tmp_path / "final")

    merged, info = _transform("merge_adapters", tmp_path / "final")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base.model.layers[0].self_attn.q_proj.weight + (8 / 4) * b @ a
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with pytest.raises(ConfigError, match="holds no adapter"):
        _transform("merge_adapters", tmp_path / "base")


def test_densify_reports_the_sparsity_it_hands_on_and_keeps_the_weights(tmp_path):
    sparse = _tiny_llama()
    with torch.no_grad():
        for module in sparse.modules():
            if isinstance(module, torch.nn.Linear) and module is not sparse.lm_head:
                mask = torch.rand_like(module.weight) < 0.75
                module.weight[mask] = 0.0
    linears = [m for m in sparse.modules() if isinstance(m, torch.nn.Linear)]
    zero_share = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    sparse.save_pretrained(tmp_path / "sparse")
    dense, info = _transform("densify", tmp_path / "sparse")
    assert info["linear_zero_fraction"] == pytest.approx(zero_share)
    for p, q in zip(dense.parameters(), sparse.parameters()):
        assert torch.equal(p, q) and p.requires_grad


# ---------------------------------------------------------------------------------------------- pipelines
def _eval_losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["eval_loss"] for l in lines if "eval_loss" in l}


def _losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(l["step"], k): l[k] for l in lines for k in ("loss", "eval_loss") if k in l}


@pytest.mark.slow
def test_stage_two_starts_from_exactly_the_weights_stage_one_ended_with(tmp_path, train_in_process):
    run = tmp_path / "run"
    summary = train_in_process([TWO_STAGES, "stages.1.train.max_steps=3"], run)
    first, second = run / "stages" / "01-first", run / "stages" / "02-second"
    # the same weights on the same held-out rows: stage 2's loss before its first step is stage 1's final loss
    assert _eval_losses(second)[0] == pytest.approx(_eval_losses(first)[4], abs=1e-6)
    assert [r["stage"] for r in summary["stages"]] == ["first", "second"]
    assert [r["steps"] for r in summary["stages"]] == [4, 3]
    assert summary["totals"]["tokens"] == sum(r["tokens"] for r in summary["stages"]) == 7 * 4 * 64
    assert summary["totals"]["flops"] == pytest.approx(sum(r["flops"] for r in summary["stages"]))
    assert summary["finished"] and summary["final_model"] == str(second / "final_model")
    assert json.loads((run / "summary.json").read_text())["stages"][1]["final_eval_loss"] == \
        summary["stages"][1]["final_eval_loss"]
    # the pipeline's record is what `effitrain resume RUN_DIR` reloads; each stage is a complete run directory
    assert "stages" in (run / "config.yaml").read_text()
    for stage in (first, second):
        assert (stage / "config.yaml").is_file() and (stage / "final_model" / "config.json").is_file()

    stored = {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and "lock" not in path.name}
    again = train_in_process([TWO_STAGES, "stages.1.train.max_steps=3", "resume=auto"], run)
    assert again == json.loads((run / "summary.json").read_text())   # a finished pipeline is reported, not re-run
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and "lock" not in path.name} == stored


@pytest.mark.slow
def test_g_stack_grows_the_trained_small_model_and_continues(tmp_path, train_in_process):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    summary = train_in_process(["+recipe=g_stack", "train.max_steps=3", "stages.0.model.num_layers=1"], run)
    assert summary["finished"] and [r["stage"] for r in summary["stages"]] == ["small", "stacked"]
    assert summary["stages"][1]["transform"]["info"]["order"] == [0, 0, 0, 0]
    small = AutoModelForCausalLM.from_pretrained(run / "stages" / "01-small" / "final_model")
    start = AutoModelForCausalLM.from_pretrained(run / "handoff" / "02-stacked")
    assert start.config.num_hidden_layers == 4
    for layer in start.model.layers:
        assert torch.equal(layer.mlp.down_proj.weight, small.model.layers[0].mlp.down_proj.weight)
    # stage 2 trained the stacked model, starting from those weights (loss before its first step = the handoff's)
    grown = AutoModelForCausalLM.from_pretrained(run / "stages" / "02-stacked" / "final_model")
    assert grown.config.num_hidden_layers == 4
    assert summary["stages"][1]["total_params"] > summary["stages"][0]["total_params"]


@pytest.mark.slow
def test_sigkill_during_stage_two_then_resume_continues_stage_two_only(tmp_path):
    stages = ("+stages=[{name: first, train: {max_steps: 6}}, "
              "{name: second, train: {max_steps: 80, save_every: 8}}]")
    tiny = [o for o in TINY if not o.startswith("train.max_steps=")]  # it would shorten every stage
    run_args = [*tiny, stages, "train.keep_checkpoints=3", "optimizer.lr=3e-3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]

    sigkill_at([*run_args, f"run_dir={killed}"], killed / "stages" / "02-second" / "checkpoints" / "step_00000008" / "COMPLETE")
    first_metrics = (killed / "stages" / "01-first" / "metrics.jsonl").read_text()

    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage 1/2 'first': finished before, not re-run" in result.stdout
    assert "resumed from" in result.stdout and "step_00000008" in result.stdout
    assert (killed / "stages" / "01-first" / "metrics.jsonl").read_text() == first_metrics

    expected, resumed = _losses(full / "stages" / "02-second"), _losses(killed / "stages" / "02-second")
    assert set(resumed) == set(expected)
    later = [key for key in expected if key[0] > 8]
    assert len(later) >= 70
    for key in later:
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
    assert json.loads((killed / "summary.json").read_text())["finished"]


def test_a_resumed_pipeline_may_change_a_stages_length_but_not_what_it_computes(tmp_path):
    import yaml

    from effitrain.config.resume import check_resume_config

    stored = compose_config([TWO_STAGES]).cfg
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    longer = compose_config([TWO_STAGES, "stages.1.train.max_steps=60"]).cfg
    check_resume_config(tmp_path, longer, "auto")
    other = compose_config([TWO_STAGES, "+stages.1.optimizer.lr=1e-4"]).cfg
    with pytest.raises(ConfigError, match=re.escape("stages.1.optimizer.lr: '<unset>' -> 0.0001")):
        check_resume_config(tmp_path, other, "auto")
