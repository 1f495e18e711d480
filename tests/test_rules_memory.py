"""Compatibility rules of the memory-efficient blocks: each refusal names the rule and the alternative."""

from __future__ import annotations

import pytest

from effitrain.config.compose import compose_config
from effitrain.config.rules import Environment, check_rules
from effitrain.config.spec import validate
from effitrain.registry import ConfigError


def spec(*overrides):
    composed = compose_config(list(overrides))
    return composed, lambda: validate(composed.cfg, composed.recipes)


@pytest.mark.parametrize("recipe", ["galore", "galore_8bit", "natural_galore", "dct_lowrank", "apollo", "adam_mini"])
def test_shape_aware_optimizers_refuse_zero_1_and_above(recipe):
    _, check = spec(f"+recipe={recipe}", "parallelism=zero1")
    with pytest.raises(ConfigError, match=r"\[galore_needs_2d_gradients\].*ZeRO stage 1.*parallelism=ddp.*adamw_8bit"):
        check()
    spec(f"+recipe={recipe}")[1]()   # ZeRO stage 0 is fine


def test_lisa_refuses_zero_and_peft():
    with pytest.raises(ConfigError, match=r"\[lisa_needs_unsharded_state\].*ZeRO stage 3.*partitions the "
                                          r"parameters.*parallelism=ddp"):
        spec("+recipe=lisa", "parallelism=zero3")[1]()
    with pytest.raises(ConfigError, match=r"\[lisa_needs_unsharded_state\].*ZeRO stage 2"):
        spec("+recipe=lisa", "parallelism=zero2")[1]()
    with pytest.raises(ConfigError, match=r"\[lisa_full_model_only\].*peft 'lora'.*peft=none"):
        spec("+recipe=lisa", "peft=lora")[1]()
    spec("+recipe=lisa")[1]()


@pytest.mark.parametrize("recipe", ["lora", "ia3", "prefix_tuning", "mam_adapter", "sltrain"])
def test_peft_refuses_zero3_saving_but_allows_zero2(recipe):
    with pytest.raises(ConfigError, match=r"\[peft_zero3_saving\].*ZeRO-3.*parallelism=zero2"):
        spec(f"+recipe={recipe}", "parallelism=zero3")[1]()
    spec(f"+recipe={recipe}", "parallelism=zero2")[1]()


def test_eight_bit_optimizers_refused_on_devices_without_kernels(monkeypatch):
    from effitrain.config.blocks import optimizer_lowmem
    s = spec("+recipe=adamw_8bit")[1]()
    check_rules(s, Environment(device_type="cuda"))
    check_rules(s, Environment(device_type=None))      # unknown device: decided at launch
    # the installed bitsandbytes has CPU kernels (0.50+): accepted on CPU
    if optimizer_lowmem.bnb_version() and optimizer_lowmem.bnb_version() >= (0, 50):
        check_rules(s, Environment(device_type="cpu"))
    with pytest.raises(ConfigError, match=r"\[eight_bit_optimizer_device\].*device 'mps'.*optimizer=adamw"):
        check_rules(s, Environment(device_type="mps"))
    # an older bitsandbytes, whose 8-bit kernels were CUDA-only, is refused on CPU
    monkeypatch.setattr(optimizer_lowmem, "bnb_version", lambda: (0, 45, 5))
    with pytest.raises(ConfigError, match=r"\[eight_bit_optimizer_device\].*>= 0.50 on CPU \(installed: 0.45.5"):
        check_rules(s, Environment(device_type="cpu"))
    check_rules(s, Environment(device_type="cuda"))
    monkeypatch.setattr(optimizer_lowmem, "bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed"):
        check_rules(s, Environment(device_type="cuda"))


def test_galore_8bit_is_covered_by_the_8bit_rule_and_32bit_galore_is_not(monkeypatch):
    from effitrain.config.blocks import optimizer_lowmem
    monkeypatch.setattr(optimizer_lowmem, "bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"optimizer 'galore' with 8-bit state"):
        check_rules(spec("+recipe=galore_8bit")[1](), Environment(device_type="cpu"))
    check_rules(spec("+recipe=galore")[1](), Environment(device_type="cpu"))


def test_typed_parameters_catch_mistakes_before_anything_is_built():
    with pytest.raises(ConfigError, match=r"optimizer.state_bits: 4 is not one of 32, 8"):
        spec("+recipe=galore", "optimizer.state_bits=4")[1]()
    with pytest.raises(ConfigError, match=r"optimizer.rank: -4 is out of range"):
        spec("+recipe=galore", "optimizer.rank=-4")[1]()
    with pytest.raises(ConfigError, match=r"optimizer.update_proj_gapp: unknown key \(did you mean 'update_proj_gap'"):
        spec("+recipe=galore", "+optimizer.update_proj_gapp=3")[1]()
    with pytest.raises(ConfigError, match=r"methods.lisa.active_layers: 0 is out of range"):
        spec("+recipe=lisa", "methods.lisa.active_layers=0")[1]()


def test_rules_table_lists_the_memory_rules():
    from effitrain.config.rules import rules_table
    table = rules_table()
    for name in ("galore_needs_2d_gradients", "lisa_needs_unsharded_state", "lisa_full_model_only",
                 "peft_zero3_saving", "eight_bit_optimizer_device"):
        assert name in table
