"""Per-layer weight updates: each parameter is stepped inside backward and its gradient freed at once."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.registry import ConfigError


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128))


def build(name, model, per_layer, **kw):
    spec = validate(compose_config([f"optimizer={name}", f"optimizer.per_layer_updates={str(per_layer).lower()}",
                                    "train.clip_grad_norm=0", *kw.get("overrides", [])]).cfg)
    return spec.block("optimizer").build(model, max_steps=20)


def batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(n)]


@pytest.mark.parametrize("name,overrides", [("adamw", []), ("galore", ["optimizer.rank=8", "optimizer.update_proj_gap=2"]),
                                            ("apollo", ["optimizer.rank=4"]), ("adam_mini", [])])
def test_per_layer_updates_give_the_same_weights_as_one_step_after_backward(name, overrides):
    ref, fast = tiny_llama(), tiny_llama()
    opt_ref = build(name, ref, False, overrides=overrides)
    opt_fast = build(name, fast, True, overrides=overrides)
    for x in batches(4):
        ref(input_ids=x, labels=x).loss.backward(); opt_ref.step(); opt_ref.zero_grad(set_to_none=True)
        fast(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is None for p in fast.parameters())   # every gradient already applied and freed
        opt_fast.step()                                          # what DeepSpeed calls next: a no-op now
    for (n, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_only_one_gradient_is_alive_when_a_parameter_is_stepped():
    model = tiny_llama()
    opt = build("adamw", model, True)
    live = []
    inner = opt.per_layer._inner_step
    opt.per_layer._inner_step = lambda: (live.append(sum(p.grad is not None for p in model.parameters())), inner())
    x = batches(1)[0]
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    n_params = len(list(model.parameters()))
    assert len(live) == n_params and max(live) == 1
    # the gradient norm is still reported (accumulated in the hooks, read once per step)
    ref = tiny_llama()
    ref(input_ids=x, labels=x).loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    from effitrain.optim.per_layer import per_layer_grad_norm
    assert torch.allclose(per_layer_grad_norm(opt), expected, rtol=1e-5)
    assert per_layer_grad_norm(opt) is None     # consumed


def check(*overrides):
    composed = compose_config(list(overrides))
    return validate(composed.cfg, composed.recipes)


@pytest.mark.parametrize("extra,reason", [
    (["train.clip_grad_norm=1.0"], r"global clipping needs every gradient.*train.clip_grad_norm=0"),
    (["train.clip_grad_norm=0", "train.grad_accum=2"], r"grad_accum=2.*every micro-batch"),
    (["train.clip_grad_norm=0", "parallelism=zero1"], r"galore_needs_2d_gradients|ZeRO stage 1"),
    (["train.clip_grad_norm=0", "precision=bf16"], r"precision=bf16.*master-weight wrapper.*precision=fp32"),
])
def test_rule_refuses_what_per_layer_updates_cannot_do(extra, reason):
    with pytest.raises(ConfigError, match=reason):
        check("+recipe=galore", "optimizer.per_layer_updates=true", *extra)


def test_rule_refuses_several_processes_at_launch_and_lisa():
    from effitrain.config.rules import Environment, check_rules
    spec = check("+recipe=galore", "optimizer.per_layer_updates=true", "train.clip_grad_norm=0")
    check_rules(spec, Environment(device_type="cpu", world_size=1))
    with pytest.raises(ConfigError, match=r"per_layer_updates_limits.*2 processes"):
        check_rules(spec, Environment(device_type="cpu", world_size=2))
    with pytest.raises(ConfigError, match=r"LISA"):
        check("+recipe=lisa", "optimizer.per_layer_updates=true", "train.clip_grad_norm=0")


@pytest.mark.slow
def test_a_training_run_with_per_layer_updates(tmp_path, train_in_process):
    summary = train_in_process(["+recipe=galore", "optimizer.per_layer_updates=true", "train.clip_grad_norm=0",
                                "train.max_steps=4", "train.log_every=2"], tmp_path / "run")
    assert summary["finished"] and summary["steps"] == 4
    lines = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in l]
    assert lines and all('"grad_norm": 0.0' not in l for l in lines)
