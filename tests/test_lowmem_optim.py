"""8-bit AdamW, APOLLO / APOLLO-Mini and Adam-mini built from their blocks: the update each one computes."""

from __future__ import annotations

import math
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


# -- APOLLO ------------------------------------------------------------------------------------------------------

def apollo_params(**kw):
    base = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, rank=4, update_proj_gap=200,
                refreshes_per_run=None, scale=1.0, scale_type="channel", scale_front=False, seed=0,
                target_modules=["mlp"], per_layer_updates=False)
    base.update(kw)
    return NS(**base)


def one_matrix(m=32, n=16):
    model = torch.nn.Module()
    model.mlp = torch.nn.Linear(n, m, bias=False)
    torch.nn.init.zeros_(model.mlp.weight)
    return model, model.mlp.weight


def test_apollo_update_of_a_projected_weight_is_full_rank():
    from effitrain.optim.apollo import build_apollo
    model, w = one_matrix()
    opt = build_apollo(apollo_params(rank=4), model)
    torch.manual_seed(0)
    w.grad = torch.randn(32, 16)                       # a full-rank (16) gradient
    opt.step()
    update = -w.detach()
    # the raw gradient scaled per row: rank 16, not confined to the rank-4 projection used for the statistics
    assert torch.linalg.matrix_rank(update).item() == 16
    ratio = update / w.grad
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)   # one factor per channel (row)
    assert opt.state[w]["exp_avg"].shape == (32, 4)   # state is rank-r: m x r for a tall matrix


def test_apollo_channel_factor_is_the_norm_ratio_of_adam_to_raw_projected_gradient():
    from effitrain.optim.apollo import build_apollo
    model, w = one_matrix(16, 32)                     # wide: columns are the channels, P is m x r
    opt = build_apollo(apollo_params(rank=4, lr=1.0), model)
    torch.manual_seed(1)
    g = torch.randn(16, 32)
    w.grad = g.clone()
    opt.step()
    proj = opt.state[w]["proj"]                       # 16 x 4, Gaussian with variance 1/4
    assert proj.shape == (16, 4)
    low = proj.T @ g                                  # 4 x 32
    b1, b2, eps = 0.9, 0.999, 1e-6
    adam = (1 - b1) * low / ((1 - b2) ** 0.5 * low.abs() + eps)
    factor = adam.norm(dim=0, keepdim=True) / (low.norm(dim=0, keepdim=True) + 1e-8)
    step_size = (1 - b2) ** 0.5 / (1 - b1)
    assert torch.allclose(-w.detach(), step_size * g * factor, rtol=1e-4)


def test_apollo_mini_is_rank_one_tensor_wise_with_alpha_128():
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.optim.apollo import ApolloAdamW
    composed = compose_config(["+recipe=apollo_mini"])
    p = validate(composed.cfg, composed.recipes).block("optimizer").params
    assert (p.rank, p.scale_type, p.scale, p.scale_front) == (1, "tensor", 128.0, True)
    model, w = one_matrix()
    opt = ApolloAdamW([{"params": [w], "apollo": True}], lr=1.0, rank=1, scale=128.0, scale_type="tensor",
                      scale_front=True)
    torch.manual_seed(2)
    g = torch.randn(32, 16)
    w.grad = g.clone()
    opt.step()
    low = g @ opt.state[w]["proj"].T                   # 32 x 1
    adam = 0.1 * low / (0.001 ** 0.5 * low.abs() + 1e-6)
    factor = adam.norm() / (low.norm() + 1e-8)
    # one scalar for the whole tensor, alpha applied once, as sqrt(128)
    expected = (0.001 ** 0.5 / 0.1) * math.sqrt(128.0) * factor * g
    assert torch.allclose(-w.detach(), expected, rtol=1e-4)


def test_apollo_norm_growth_limiter_caps_growth_at_one_percent_per_step():
    from effitrain.optim.apollo import ApolloAdamW
    opt = ApolloAdamW([torch.nn.Parameter(torch.zeros(1))], rank=4, scale_type="tensor")
    low = torch.ones(8, 4)                              # Adam update == raw projected gradient: factor 1
    spike = torch.full((8, 8), 10.0 / 8)                # norm 10 after a step whose update had norm 1
    state = {"prev_norm": torch.tensor(1.0)}
    out = opt._scaled_gradient(spike, low, low, state, tall=True)
    assert out.norm().item() == pytest.approx(1.01, rel=1e-5) and state["prev_norm"].item() == pytest.approx(1.01)
    calm = torch.full((8, 8), 0.5 / 8)                  # shrinking is never limited
    out = opt._scaled_gradient(calm, low, low, state, tall=True)
    assert out.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_apollo_redraws_the_projection_every_gap_steps_and_adams_the_rest():
    from effitrain.optim.apollo import build_apollo
    model = tiny_llama()
    opt = build_apollo(apollo_params(update_proj_gap=None, refreshes_per_run=5, target_modules=["self_attn", "mlp"]),
                       model, max_steps=15)           # gap 3
    up = model.model.layers[0].mlp.up_proj.weight
    draws, counts = [], []
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(7):
        model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
        draws.append(opt.state[up]["proj"].clone()); counts.append(int(opt.state[up]["proj_count"]))
    assert counts == [1, 1, 1, 2, 2, 2, 3]          # redrawn at steps 1, 4, 7 with a new seed each time
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[2], draws[3])
    emb = model.model.embed_tokens.weight
    assert opt.state[emb]["exp_avg"].shape == emb.shape and "proj" not in opt.state[emb]


def test_apollo_trains_the_tiny_model():
    from effitrain.optim.apollo import build_apollo
    model = tiny_llama()
    opt = build_apollo(apollo_params(target_modules=["self_attn", "mlp"]), model)
    losses = fit(model, opt)
    assert losses[-1] < losses[0] - 1.0


# -- Adam-mini ---------------------------------------------------------------------------------------------------

def v_sizes(opt, model):
    fit(model, opt, steps=1)
    return {g["name"]: opt.state[g["params"][0]]["v"].numel() for g in opt.param_groups}


def test_adam_mini_current_partition_block_sizes():
    from effitrain.optim.adam_mini import build_adam_mini
    model = tiny_llama()                              # hidden 64, 4 heads of 16, 2 kv heads, vocab 128
    opt = build_adam_mini(NS(**ADAM, partition="v1.1", per_layer_updates=False), model)
    v = v_sizes(opt, model)
    layer = "model.layers.0."
    assert v[layer + "self_attn.q_proj.weight"] == 4          # one per query head
    assert v[layer + "self_attn.k_proj.weight"] == 2          # one per key head (GQA: 2 kv heads)
    assert v[layer + "self_attn.v_proj.weight"] == 32         # one per output neuron (2 kv heads x 16)
    assert v[layer + "self_attn.o_proj.weight"] == 64
    assert v[layer + "mlp.up_proj.weight"] == 128 and v[layer + "mlp.down_proj.weight"] == 64
    assert v["model.embed_tokens.weight"] == 128              # one per token
    assert v[layer + "input_layernorm.weight"] == 1           # one for the whole norm
    total_v = sum(v.values())
    assert total_v < sum(p.numel() for p in model.parameters()) / 50   # about 1% of Adam's v


def test_adam_mini_older_partition_is_a_named_option():
    from effitrain.optim.adam_mini import build_adam_mini
    model = tiny_llama()
    opt = build_adam_mini(NS(**ADAM, partition="v1.0", per_layer_updates=False), model)
    v = v_sizes(opt, model)
    assert v["model.embed_tokens.weight"] == 128 * 64         # embedding: full Adam
    assert v["model.layers.0.self_attn.q_proj.weight"] == 4
    assert v["model.layers.0.self_attn.v_proj.weight"] == 1   # one per tensor
    assert v["model.layers.0.mlp.up_proj.weight"] == 1


def test_adam_mini_step_by_hand_for_one_head_block():
    from effitrain.optim.adam_mini import AdamMini
    q = torch.nn.Parameter(torch.zeros(4, 2))                 # 2 heads of head_dim 2 (rows), 2 inputs
    opt = AdamMini([("attn.q_proj.weight", q)], head_dim=2, lr=1.0, betas=(0.9, 0.99), eps=0.0)
    g = torch.tensor([[1., 1.], [1., 1.], [3., 0.], [0., 4.]])
    q.grad = g
    opt.step()
    # head 0: mean g^2 = 1 -> step g / 1; head 1: mean g^2 = (9 + 16) / 4 -> step g / 2.5 (bias-corrected Adam)
    assert torch.allclose(-q.detach(), torch.cat([g[:2] / 1.0, g[2:] / 2.5]), atol=1e-6)


def test_adam_mini_lr_defaults_to_the_adamw_lr_and_trains():
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.optim.adam_mini import build_adam_mini
    mini = compose_config(["+recipe=adam_mini"])
    base = compose_config(["+recipe=baseline"])
    assert validate(mini.cfg, mini.recipes).block("optimizer").params.lr == \
        validate(base.cfg, base.recipes).block("optimizer").params.lr
    model = tiny_llama()
    losses = fit(model, build_adam_mini(NS(**ADAM, partition="v1.1", per_layer_updates=False), model))
    assert losses[-1] < losses[0] - 1.0


def test_adam_mini_needs_head_counts():
    from effitrain.optim.adam_mini import build_adam_mini
    from effitrain.registry import ConfigError
    with pytest.raises(ConfigError, match="num_attention_heads"):
        build_adam_mini(NS(**ADAM, partition="v1.1", per_layer_updates=False), torch.nn.Linear(4, 4))


@pytest.mark.parametrize("which", ["apollo", "adam_mini"])
def test_a_resumed_optimizer_continues_exactly(tmp_path, which):
    # the state holds only tensors (APOLLO's projection and its draw count included), so it loads with
    # weights_only=True, and the next step after loading equals the next step of the uninterrupted optimizer
    from effitrain.optim.adam_mini import build_adam_mini
    from effitrain.optim.apollo import build_apollo

    def make(model):
        if which == "apollo":
            return build_apollo(apollo_params(update_proj_gap=2, target_modules=["self_attn", "mlp"]), model)
        return build_adam_mini(NS(**ADAM, partition="v1.1", per_layer_updates=False), model)

    a = tiny_llama()
    opt_a = make(a)
    fit(a, opt_a, steps=3)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    fit(a, opt_a, steps=2)
    b = tiny_llama()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b = make(b)
    opt_b.load_state_dict(ckpt["opt"])
    fit(b, opt_b, steps=2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n
