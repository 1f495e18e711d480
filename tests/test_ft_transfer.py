"""Fine-tuning transfer (recipe ft_transfer, transform add_diff_vector): the new base plus the diff vector of a
fine-tuning of the old base, tensor by tensor; models of another architecture are refused with one line naming the
key; a stage may start from any earlier stage's model (``init: '@stage:NAME'``); the four-stage recipe survives a
SIGTERM in its last stage and resumes there, and its handoff model is exactly base_v2 + (ft_v1 - base_v1)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, effitrain_cli, sigterm_after_step
from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.models.diff_vector import transfer_state
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError


def _tiny_model(seed: int, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**config, **changes}))


def _save(model, folder):
    model.save_pretrained(str(folder))
    return str(folder)


def _transform(**params):
    load_builtin_blocks()
    return REGISTRY.parse("transform", {"name": "add_diff_vector", **params}, "transform")


def test_transfer_state_adds_the_scaled_difference_to_every_tensor():
    target = {"w": torch.tensor([2.0, -1.0]), "b": torch.tensor([0.5])}
    finetuned = {"w": torch.tensor([1.5, 3.0]), "b": torch.tensor([1.0])}
    base = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.25])}
    # delta = [0.5, 2.0] and [0.75]
    assert {k: v.tolist() for k, v in transfer_state(target, finetuned, base).items()} == \
        {"w": [2.5, 1.0], "b": [1.25]}
    assert transfer_state(target, finetuned, base, scale=0.5)["w"].tolist() == [2.25, 0.0]
    bf16 = transfer_state({"w": target["w"].bfloat16()}, {"w": finetuned["w"]}, {"w": base["w"]})
    assert bf16["w"].dtype == torch.bfloat16 and bf16["w"].tolist() == [2.5, 1.0]  # the target's dtype kept


def test_the_transform_gives_the_new_base_plus_the_diff_vector_of_the_old(tmp_path):
    base_v1, base_v2 = _tiny_model(0), _tiny_model(1)
    finetuned = _tiny_model(0)
    with torch.no_grad():  # a "fine-tuning": a known change of every weight
        for p in finetuned.parameters():
            p.add_(0.125)
    paths = {name: _save(m, tmp_path / name) for name, m in
             (("base_v1", base_v1), ("base_v2", base_v2), ("ft_v1", finetuned))}
    model, info = _transform(finetuned=paths["ft_v1"], base=paths["base_v1"]).build(tmp_path / "base_v2")
    out, v1, v2, ft = (m.state_dict() for m in (model, base_v1, base_v2, finetuned))
    for name, weight in out.items():
        expected = (v2[name].double() + (ft[name].double() - v1[name].double())).float()
        assert torch.equal(weight, expected), name
    # every weight moved by the fine-tuning's 0.125 (up to float rounding of the saved fine-tuned copy)
    assert torch.allclose(out["model.layers.0.mlp.up_proj.weight"],
                          v2["model.layers.0.mlp.up_proj.weight"] + 0.125, atol=1e-6)
    assert info["scale"] == 1.0 and info["tensors"] == len(out) and info["delta_l2_norm"] > 0


@pytest.mark.parametrize("changes, key, message", [
    ({"hidden_size": 16}, "transform.finetuned", "hidden_size 16 (the target base has 8)"),
    ({"vocab_size": 40}, "transform.finetuned", "vocab_size 40"),
    ({"num_hidden_layers": 3}, "transform.finetuned", "num_hidden_layers 3"),
])
def test_a_finetuned_model_of_another_architecture_is_refused_naming_the_key(tmp_path, changes, key, message):
    paths = {"base": _save(_tiny_model(0), tmp_path / "base"), "target": _save(_tiny_model(1), tmp_path / "target"),
             "other": _save(_tiny_model(0, **changes), tmp_path / "other")}
    with pytest.raises(ConfigError) as error:  # folders exist: refused at validation, before any weight is read
        _transform(finetuned=paths["other"], base=paths["base"])
    assert str(error.value).startswith(f"{key}: ") and message.split(" (")[0] in str(error.value)
    with pytest.raises(ConfigError, match=f"^{key}: .*{message.replace('(', '[(]').replace(')', '[)]')}"):
        # the same fine-tuned model against a target base of the other shape: refused when the transform runs
        REGISTRY.parse("transform", {"name": "add_diff_vector", "finetuned": paths["other"], "base": paths["other"]},
                       "transform").build(tmp_path / "target")


def test_a_tensor_of_another_shape_under_the_same_config_is_refused(tmp_path):
    from effitrain.models.diff_vector import check_same_tensors

    target = {"a": torch.zeros(2, 3), "b": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"^transform.base: 'B' has a of shape \(3, 2\), the target base 'T' "
                                          r"\(2, 3\); a diff vector needs the same architecture$"):
        check_same_tensors(target, {"a": torch.zeros(3, 2), "b": torch.zeros(1)}, "transform.base", "B", "T")
    with pytest.raises(ConfigError, match="^transform.base: 'B' lacks tensor b"):
        check_same_tensors(target, {"a": torch.zeros(2, 3)}, "transform.base", "B", "T")


def test_check_refuses_mismatched_user_folders_in_one_line_with_exit_status_2(tmp_path):
    base, other = _save(_tiny_model(0), tmp_path / "base"), _save(_tiny_model(0, hidden_size=16), tmp_path / "ft")
    target = _save(_tiny_model(1), tmp_path / "target")
    stage = (f"+stages=[{{name: transfer, init: '{target}', transform: {{name: add_diff_vector, "
             f"finetuned: '{other}', base: '{base}'}}}}]")
    result = effitrain_cli("check", stage)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "stages.transfer.transform.finetuned:" in lines[0] and "hidden_size 16" in lines[0]


def test_check_refuses_a_target_base_of_another_architecture_before_anything_runs(tmp_path):
    base, finetuned = _save(_tiny_model(0), tmp_path / "base"), _save(_tiny_model(0), tmp_path / "ft")
    target = _save(_tiny_model(1, num_hidden_layers=3), tmp_path / "target")
    stage = (f"+stages=[{{name: transfer, init: '{target}', transform: {{name: add_diff_vector, "
             f"finetuned: '{finetuned}', base: '{base}'}}}}]")
    with pytest.raises(ConfigError, match=r"^stages.transfer.transform.finetuned: .* differs from the stage's model "
                                          r".* in num_hidden_layers 2 \(the target base has 3\)"):
        composed = compose_config([stage])
        validate(composed.cfg, composed.recipes)


def test_a_stage_may_start_from_any_earlier_stage_and_must_name_one():
    composed = compose_config(["+recipe=ft_transfer"])
    spec = validate(composed.cfg, composed.recipes)
    assert [s.init for s in spec.stages] == ["scratch", "previous", "@stage:base_v1", "previous"]
    assert spec.stage_specs[2].block("model").params.path == "<final model of stage base_v1>"
    assert spec.stage_specs[2].block("dataset").name == "demo"          # continued pre-training, not the chat data
    assert spec.stage_specs[3].block("objective").name == "sft"
    with pytest.raises(ConfigError, match=r"stages.b.init: '@stage:c' must name an earlier stage; earlier stages: a"):
        composed = compose_config(["+stages=[{name: a}, {name: b, init: '@stage:c'}]"])
        validate(composed.cfg, composed.recipes)


@pytest.mark.slow
def test_the_recipe_survives_sigterm_in_its_transfer_stage_and_hands_over_the_exact_sum(tmp_path, train_in_process):
    # one step for each earlier stage, no generation-based evaluation: the stages' plumbing, not their training
    run = ["+recipe=ft_transfer", "train.max_steps=1", "stages.3.train.max_steps=4", "train.eval_every=0",
           "+stages.3.train.save_every=2", "~stages.1.methods", "~stages.3.methods"]
    run_dir = tmp_path / "run"
    with sigterm_after_step(2, when=lambda state: state.run_dir.name == "04-transfer"):
        stopped = train_in_process(run, run_dir)
    assert not stopped["finished"] and [r["stage"] for r in stopped["stages"]][-1] == "transfer"
    summary = train_in_process([*run, "resume=auto"], run_dir)
    assert summary["finished"]
    rows = {r["stage"]: r for r in summary["stages"]}
    assert [rows[s]["skipped_as_finished"] for s in ("base_v1", "ft_v1", "base_v2", "transfer")] == \
        [True, True, True, False]
    steps = [json.loads(line)["step"] for line in (run_dir / "stages" / "04-transfer" / "metrics.jsonl")
             .read_text().splitlines() if "loss" in json.loads(line)]
    assert sorted(set(steps)) == [1, 2, 3, 4]

    from transformers import AutoModelForCausalLM

    def state(folder):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()

    stages = run_dir / "stages"
    v1, ft, v2 = (state(stages / name / "final_model") for name in ("01-base_v1", "02-ft_v1", "03-base_v2"))
    handed = state(run_dir / "handoff" / "04-transfer")
    assert not torch.equal(v1["model.norm.weight"], v2["model.norm.weight"])  # base_v2 trained on from base_v1
    for name, weight in handed.items():
        assert torch.equal(weight, (v2[name].double() + ft[name].double() - v1[name].double()).float()), name
