"""Muon + AdamW built from the `muon` block: which parameter gets which update, and what each update is."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace as NS

import torch

from effitrain.optim.muon import build_muon


def tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=tied))


def muon_params(**kw):
    base = dict(lr=1e-2, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr="match_rms_adamw",
                adamw_lr=None, beta1=0.9, beta2=0.95, eps=1e-8)
    base.update(kw)
    return NS(**base)


def backward(model, seed=0):
    x = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.item()


def test_hidden_matrices_go_to_muon_embedding_head_norms_to_adamw():
    for tied in (False, True):
        model = tiny_llama(tied)
        opt = build_muon(muon_params(), model)
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for p in opt.matrix_parameters()}
        adamw = {names[id(p)] for g in opt.param_groups if not g["matrix"] for p in g["params"]}
        assert muon == {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n
                        and "lm_head" not in n}
        assert any(n.endswith("o_proj.weight") for n in muon) and any(n.endswith("down_proj.weight") for n in muon)
        assert "model.embed_tokens.weight" in adamw and ("lm_head.weight" in adamw) != tied
        assert all(n.endswith("norm.weight") or "embed" in n or "lm_head" in n for n in adamw)
        # embedding/head decay; norms do not
        decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups if not g["matrix"] for p in g["params"]}
        assert decay["model.embed_tokens.weight"] == 0.1 and decay["model.norm.weight"] == 0.0


def test_hidden_update_is_orthogonalised_and_scaled_by_moonlight_factor():
    model = tiny_llama()
    lr = 1e-2
    opt = build_muon(muon_params(lr=lr, weight_decay=0.0), model)
    w = model.model.layers[0].mlp.down_proj.weight            # 64 x 96
    before = w.detach().clone()
    backward(model)
    grad = w.grad.detach().clone()
    opt.step()
    update = (before - w.detach()) / lr
    # Moonlight's scale: update = 0.2 * sqrt(max(A, B)) * O, O with singular values ~1 (NS5: within ~[0.5, 1.5])
    scale = 0.2 * math.sqrt(max(w.shape))
    sv = torch.linalg.svdvals(update / scale)
    assert sv.min() > 0.5 and sv.max() < 1.5, sv
    assert sv.max() / sv.min() < 3
    # the raw gradient is far from orthogonal: the orthogonalisation did the flattening
    g_sv = torch.linalg.svdvals(grad)
    assert g_sv.max() / g_sv.min() > 10
    # and it is the polar factor's direction: UV^T of the gradient (first step, nesterov: g + m ∝ g)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((update / scale).flatten(), (u @ vh).flatten(), dim=0)
    assert cos > 0.9
    # RMS of the update matches AdamW's typical 0.2-0.4 range: 0.2 * sqrt(max)/sqrt(min)-ish, not the raw ~1/sqrt(n)
    rms = update.pow(2).mean().sqrt().item()
    assert 0.1 < rms < 0.3, rms


def test_original_scale_and_decoupled_decay():
    model = tiny_llama()
    lr, wd = 1e-2, 0.5
    opt = build_muon(muon_params(lr=lr, weight_decay=wd, adjust_lr="original"), model)
    w = model.model.layers[0].mlp.up_proj.weight              # 96 x 64: Jordan's scale sqrt(96/64)
    before = w.detach().clone()
    backward(model)
    opt.step()
    # decoupled decay uses the unscaled lr: w' = w (1 - lr wd) - lr * s * O
    o = ((before * (1 - lr * wd)) - w.detach()) / (lr * math.sqrt(96 / 64))
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.5


def test_other_parameters_follow_torch_adamw_exactly():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    opt = build_muon(muon_params(lr=1e-2, weight_decay=0.1), model)
    adam_names = {n for n, p in model.named_parameters()
                  if any(p is q for g in opt.param_groups if not g["matrix"] for q in g["params"])}
    ref_params = dict(twin.named_parameters())
    ref = torch.optim.AdamW([{"params": [ref_params[n] for n in sorted(adam_names) if ref_params[n].ndim >= 2],
                              "weight_decay": 0.1},
                             {"params": [ref_params[n] for n in sorted(adam_names) if ref_params[n].ndim < 2],
                              "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        backward(model, seed=step)
        backward(twin, seed=step)
        opt.step(); opt.zero_grad()
        ref.step(); ref.zero_grad()
        # twin's hidden weights are not stepped; copy Muon's result so the forward passes stay comparable
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n not in adam_names:
                    ref_params[n].copy_(p)
    for n in adam_names:
        torch.testing.assert_close(dict(model.named_parameters())[n], ref_params[n], rtol=0, atol=0)


def test_scheduler_lr_reaches_both_parts_and_state_dict_round_trips():
    model = tiny_llama()
    opt = build_muon(muon_params(adamw_lr=2e-3), model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert {g["lr"] for g in opt._matrix.param_groups} == {0.5e-2}
    assert {g["lr"] for g in opt._adamw.param_groups} == {1e-3}
    backward(model); opt.step(); opt.zero_grad(); sched.step()

    clone = tiny_llama()
    clone.load_state_dict(model.state_dict())
    opt2 = build_muon(muon_params(adamw_lr=2e-3), clone)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    w, w2 = model.model.layers[1].self_attn.q_proj.weight, clone.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(opt2.state[w2]["momentum_buffer"], opt.state[w]["momentum_buffer"])
    # after loading, the inner optimizers step with the loaded state: the next steps agree exactly
    for _ in range(2):
        backward(model, seed=1); backward(clone, seed=1)
        opt.step(); opt2.step(); opt.zero_grad(); opt2.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert opt2._matrix.state is opt2.state and opt2._matrix.param_groups[0] is opt2.param_groups[0]


def test_memory_planner_counts_one_buffer_per_hidden_weight():
    from effitrain.planner.memory import _muon
    tensors = [("model.embed_tokens.weight", (100, 8)), ("model.layers.0.mlp.up_proj.weight", (16, 8)),
               ("model.norm.weight", (8,)), ("lm_head.weight", (100, 8))]
    assert _muon(NS(), tensors) == (8 * 800 + 4) + 4 * 128 + (8 * 8 + 4) + (8 * 800 + 4)


def test_memory_planner_equals_the_measured_state():
    from effitrain.memory import optimizer_state_bytes
    from effitrain.planner.memory import _muon
    model = tiny_llama()
    opt = build_muon(muon_params(), model)
    backward(model)
    opt.step()
    planned = _muon(NS(), [(n, tuple(p.shape)) for n, p in model.named_parameters()])
    assert optimizer_state_bytes(opt)[0] == planned
