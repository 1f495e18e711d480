"""8-bit AdamW, APOLLO and Adam-mini built from their blocks: state layout and that they train."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128))


def fit(model, opt, steps=10):
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    return losses


ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def test_adamw_8bit_stores_uint8_moments_and_trains():
    pytest.importorskip("bitsandbytes")
    from effitrain.optim.lowbit import build_adamw_8bit
    model = tiny_llama()
    opt = build_adamw_8bit(NS(**ADAM, min_8bit_size=4096), model)
    losses = fit(model, opt)
    up = model.model.layers[0].mlp.up_proj.weight      # 8192 elements: 8-bit
    norm = model.model.norm.weight                     # 64 elements: 32-bit, as bitsandbytes does
    assert opt.state[up]["state1"].dtype == torch.uint8 and opt.state[up]["state1"].shape == up.shape
    assert opt.state[norm]["state1"].dtype == torch.float32
    assert losses[-1] < losses[0] - 1.0
    # decay on matrices only
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}


def test_apollo_projects_targeted_weights_with_rank_r():
    pytest.importorskip("pytorch_optimizer")
    from effitrain.optim.lowmem import build_apollo
    model = tiny_llama()
    opt = build_apollo(NS(**ADAM, rank=4, update_proj_gap=5, scale=1.0, scale_type="channel",
                          target_modules=["self_attn", "mlp"]), model)
    losses = fit(model, opt)
    up = model.model.layers[0].mlp.up_proj.weight      # 128 x 64
    assert min(opt.state[up]["exp_avg"].shape) == 4
    emb = model.model.embed_tokens.weight
    assert opt.state[emb]["exp_avg"].shape == emb.shape
    assert losses[-1] < losses[0] - 1.0


def test_adam_mini_keeps_one_second_moment_per_block():
    pytest.importorskip("pytorch_optimizer")
    from effitrain.optim.lowmem import build_adam_mini
    model = tiny_llama()
    opt = build_adam_mini(NS(**ADAM), model)
    losses = fit(model, opt)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["v_mean"].numel() == 4       # one per attention head
    v_total = sum(s[k].numel() for s in opt.state.values() for k in ("v", "v_mean") if k in s)
    n_params = sum(p.numel() for p in model.parameters())
    assert v_total < n_params / 2
    assert losses[-1] < losses[0] - 1.0


def test_adam_mini_needs_head_counts():
    from effitrain.optim.lowmem import build_adam_mini
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_adam_mini(NS(**ADAM), torch.nn.Linear(4, 4))
