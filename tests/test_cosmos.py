"""COSMOS built from its block: the subspace it tracks, the two parts of its update, and its size."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace as NS

import torch

from effitrain.optim.cosmos import COSMOS, build_cosmos


def cosmos_params(**kw):
    base = dict(lr=1e-2, lr_ratio=0.1, rank=4, gamma=0.2, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8)
    base.update(kw)
    return NS(**base)


def one_matrix(m=24, n=16, seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(m, n) * 0.1)
    return w


def low_rank_plus_noise(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) * 3 + 0.1 * torch.randn(m, n, generator=g)


def first_step(gamma):
    w = one_matrix()
    opt = COSMOS([w], lr=1e-2, lr_ratio=0.1, rank=4, gamma=gamma)
    G = low_rank_plus_noise(24, 16, 4, seed=1)
    before = w.detach().clone()
    w.grad = G.clone()
    opt.step()
    return G, before - w.detach(), opt.state[w]["subspace"]


def test_first_step_subspace_and_the_adam_part():
    G, update, P = first_step(gamma=0.0)
    # P: orthonormal, spanning G's top-4 right singular vectors (the leading eigenvectors of GᵀG)
    torch.testing.assert_close(P.T @ P, torch.eye(4), atol=1e-5, rtol=0)
    _, _, vh = torch.linalg.svd(G)
    torch.testing.assert_close(P @ P.T, vh[:4].T @ vh[:4], atol=1e-4, rtol=0)
    # size: every hidden update has Frobenius norm lr * lr_ratio * sqrt(mn)
    assert math.isclose(update.norm().item(), 1e-2 * 0.1 * math.sqrt(24 * 16), rel_tol=1e-4)
    # without the Muon part the update is Adam's first step in the eigenbasis, sign(G P) Pᵀ, nothing outside
    expected = torch.sign(G @ P) @ P.T
    torch.testing.assert_close(update / update.norm(), expected / expected.norm(), atol=1e-5, rtol=0)


def test_first_step_muon_part_on_the_complement():
    G, update, P = first_step(gamma=0.2)
    assert math.isclose(update.norm().item(), 1e-2 * 0.1 * math.sqrt(24 * 16), rel_tol=1e-4)
    # outside the subspace: the orthogonalised remainder of the gradient, its singular values flat (Newton-Schulz)
    outside = update - update @ P @ P.T
    sv = torch.linalg.svdvals(outside)[:16 - 4]
    assert sv.max() / sv.min() < 3, sv
    residual_sv = torch.linalg.svdvals(G - G @ P @ P.T)[:16 - 4]
    assert residual_sv.max() / residual_sv.min() > 5            # the raw remainder was not flat
    # and the same directions as the remainder's polar factor
    u, _, vh = torch.linalg.svd(G - G @ P @ P.T, full_matrices=False)
    polar = u[:, :12] @ vh[:12]
    cos = torch.nn.functional.cosine_similarity(outside.flatten(), polar.flatten(), dim=0)
    assert cos > 0.9, cos


def test_subspace_follows_a_changing_gradient():
    w = one_matrix()
    opt = COSMOS([w], lr=1e-3, rank=2, betas=(0.9, 0.5))
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=g))[0].T
    a, new = basis[:2], basis[2:]                       # two orthogonal row spaces
    for step in range(24):
        rows = a if step < 2 else new                   # the gradient's row space moves after two steps
        w.grad = torch.randn(24, 2, generator=g) @ rows * 5
        opt.step()
        if step == 1:
            P = opt.state[w]["subspace"]
            torch.testing.assert_close(P @ P.T, a.T @ a, atol=1e-4, rtol=0)
    P = opt.state[w]["subspace"]
    torch.testing.assert_close(P @ P.T, new.T @ new, atol=1e-3, rtol=0)


def test_embedding_head_norms_go_to_adamw_and_state_round_trips():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=48))
    opt = build_cosmos(cosmos_params(), model)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[id(p)] for p in opt.matrix_parameters()}
    assert "model.embed_tokens.weight" not in hidden and "lm_head.weight" not in hidden
    assert hidden == {n for n, p in model.named_parameters() if p.ndim == 2} - {"model.embed_tokens.weight",
                                                                                "lm_head.weight"}
    adam_lrs = {g["lr"] for g in opt.param_groups if not g["matrix"]}
    assert adam_lrs == {1e-2}

    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))

    def step(m, o):
        m(input_ids=x, labels=x).loss.backward(); o.step(); o.zero_grad()

    step(model, opt)
    clone = copy.deepcopy(model)
    opt2 = build_cosmos(cosmos_params(), clone)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        step(model, opt); step(clone, opt2)
    for (n, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_memory_planner_counts_the_subspace_state():
    from effitrain.planner.memory import _cosmos
    s = NS(optimizer_params=NS(rank=4))
    tensors = [("model.embed_tokens.weight", (100, 8)), ("model.layers.0.mlp.up_proj.weight", (16, 8))]
    assert _cosmos(s, tensors) == (8 * 800 + 4) + 4 * (16 * 8 + 16 * 4 + 8 * 4 + 4 * 4) + 4


def test_memory_planner_equals_the_measured_state():
    from transformers import LlamaConfig, LlamaForCausalLM
    from effitrain.memory import optimizer_state_bytes
    from effitrain.planner.memory import _cosmos
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=48))
    opt = build_cosmos(cosmos_params(rank=16), model)   # 16: below 32 and 48, so the cap shows on no weight
    x = torch.randint(0, 128, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    planned = _cosmos(NS(optimizer_params=NS(rank=16)), [(n, tuple(p.shape)) for n, p in model.named_parameters()])
    assert optimizer_state_bytes(opt)[0] == planned
