"""QLoRA (peft=qlora, recipe qlora): the configs handed to transformers and peft are the paper's (NF4, double
quantisation, bf16 compute; LoRA r 64 / alpha 16 / dropout 0.1 on every linear layer but the LM head), built and
checked without a GPU; where bitsandbytes' 4-bit kernels cannot run the block is refused before anything is built,
in one line that says why and what runs instead."""

from __future__ import annotations

import pytest
import torch

from conftest import effitrain_cli
from effitrain.config.compose import compose_config
from effitrain.config.rules import Environment, check_rules
from effitrain.config.spec import validate
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError

GPU = Environment(device_type="cuda", world_size=1, bf16_supported=True, fp8_supported=True)


def _spec(*overrides):
    composed = compose_config(list(overrides))
    return validate(composed.cfg, composed.recipes, rules=False)


def _params(**values):
    load_builtin_blocks()
    return REGISTRY.parse("peft", {"name": "qlora", **values}, "peft").params


def test_the_quantization_config_is_4bit_nf4_with_double_quantisation_and_bf16_compute():
    from transformers import BitsAndBytesConfig

    from effitrain.peft.qlora import quantization_config

    config = quantization_config(_spec("+recipe=qlora").block("peft").params)
    assert isinstance(config, BitsAndBytesConfig)
    assert (config.load_in_4bit, config.load_in_8bit) == (True, False)
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = quantization_config(_params(quant_type="fp4", double_quant=False, compute_dtype="float16"))
    assert (fp4.bnb_4bit_quant_type, fp4.bnb_4bit_use_double_quant, fp4.bnb_4bit_compute_dtype) == \
        ("fp4", False, torch.float16)


def test_the_lora_config_is_the_papers_on_every_linear_layer_but_the_lm_head():
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from effitrain.peft.qlora import lora_config

    config = lora_config(_spec("+recipe=qlora").block("peft").params)
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (64, 16.0, 0.1, "none")
    assert config.target_modules == "all-linear" and config.task_type == peft.TaskType.CAUSAL_LM
    # peft's 'all-linear' on a model picks what the authors' find_all_linear_names does: every Linear but lm_head
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    theirs = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    wrapped = peft.get_peft_model(model, config)
    adapted = {name.split(".")[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == theirs == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(hasattr(m, "lora_A") for m in wrapped.modules()) == 7 * 2  # every one in both layers


def test_module_names_may_replace_all_linear_but_not_join_it():
    from effitrain.peft.qlora import lora_config

    assert sorted(lora_config(_params(target_modules=["q_proj", "v_proj"])).target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"^peft.target_modules: 'all-linear' already names every linear layer"):
        _params(target_modules=["all-linear", "q_proj"])


def test_the_rule_refuses_qlora_off_cuda_and_names_what_runs_instead(monkeypatch):
    spec = _spec("+recipe=qlora")
    with pytest.raises(ConfigError, match=r"^incompatible configuration \[qlora_needs_cuda\]: .*run is on cpu.*"
                                          r"\+recipe=lora"):
        check_rules(spec, Environment(device_type="cpu", world_size=1))
    check_rules(spec, GPU)  # a CUDA launch passes
    # the device unknown (`effitrain check`): the machine is asked, torch-free
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"this machine has none"):
        check_rules(spec, Environment())
    monkeypatch.setattr("effitrain.config.blocks.optimizer_lowmem.bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"bitsandbytes, which is not installed"):
        check_rules(spec, GPU)
    check_rules(_spec("+recipe=lora"), Environment(device_type="cpu", world_size=1))  # LoRA itself runs here


def test_check_refuses_the_recipe_without_a_gpu_in_one_line_and_builds_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = effitrain_cli("check", "+recipe=qlora", f"run_dir={run_dir}", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "[qlora_needs_cuda]" in lines[0] and "+recipe=lora" in lines[0]
    assert not run_dir.exists()
