"""Monarch layers (peft=monarch) and the monarch recipe (Dao et al., 2204.00595).

The mechanism: a Monarch layer applies P_out · blockdiag(w2) · P · blockdiag(w1) to the zero-padded input, with the
parameter count and multiply-adds of its two factors; the dense→Monarch projection recovers a Monarch matrix exactly
and no other Monarch matrix is closer to a dense one; a trained model exports as a stock dense model with the same
logits; a resumed run continues with the uninterrupted run's losses.
"""

from __future__ import annotations

import json

import pytest
import torch

from effitrain.models.monarch import MonarchLinear, apply_monarch, fold_monarch, project_dense

SHAPES = [(16, 16, 4), (64, 128, 4), (128, 64, 4), (30, 50, 4), (16, 16, 2), (64, 64, 8)]


def _explicit_matrix(layer: MonarchLinear) -> torch.Tensor:
    """The paper's form, built from permutation and block-diagonal matrices (not from the layer's forward)."""
    k, p, q, s = layer.nblocks, layer.in_block, layer.inner_block, layer.out_block
    bd1 = torch.block_diag(*layer.blkdiag1.detach())                 # [k q, k p]
    bd2 = torch.block_diag(*layer.blkdiag2.detach())                 # [k s, k q]
    # P: inner feature r*k + b goes to slot b*q + r (block b of the second factor, its r-th input)
    perm_inner = torch.zeros(k * q, k * q)
    for r in range(q):
        for b in range(k):
            perm_inner[b * q + r, r * k + b] = 1
    # P_out: output t of block b goes to position t*k + b
    perm_out = torch.zeros(k * s, k * s)
    for t in range(s):
        for b in range(k):
            perm_out[t * k + b, b * s + t] = 1
    full = perm_out @ bd2 @ perm_inner @ bd1                         # [k s, k p]
    return full[:layer.out_features, :layer.in_features]


@pytest.mark.parametrize("in_f,out_f,k", SHAPES)
def test_the_layer_is_the_papers_product_of_permutations_and_block_diagonals(in_f, out_f, k):
    torch.manual_seed(0)
    layer = MonarchLinear(in_f, out_f, k)
    x = torch.randn(3, 5, in_f)
    matrix = _explicit_matrix(layer)
    assert torch.allclose(layer(x), x @ matrix.T + layer.bias, atol=1e-5)
    assert torch.allclose(layer.dense_weight(), matrix, atol=1e-6)
    dense = torch.nn.Linear(in_f, out_f)
    dense.weight.data, dense.bias.data = matrix.clone(), layer.bias.detach().clone()
    assert torch.allclose(layer(x), dense(x), atol=1e-5)


def test_parameters_and_flops_are_those_of_the_two_factors():
    from torch.utils.flop_counter import FlopCounterMode

    layer = MonarchLinear(64, 128, 4, bias=False)
    # p = 64/4 = 16 inputs per block, s = 128/4 = 32 outputs per block, inner q = min(p, s) = 16
    assert layer.blkdiag1.shape == (4, 16, 16) and layer.blkdiag2.shape == (4, 32, 16)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 16 * 16 + 4 * 32 * 16 == 3072   # dense: 8192
    tokens = 10
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(tokens, 64))
    assert counter.get_total_flops() == 2 * tokens * 3072   # one multiply-add per parameter per token


def test_the_training_flops_count_the_monarch_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    from effitrain.engine.metrics import flops_per_token

    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    dense_params = sum(p.numel() for p in model.parameters())
    apply_monarch(model, nblocks=4, target_modules=["mlp"], init="random")
    # each MLP matrix 32x64 (or 64x32): dense 2048 weights; Monarch p=8, s=16, q=8 (or p=16, s=8, q=8): 768
    assert sum(p.numel() for p in model.parameters()) == dense_params - 2 * 3 * (2048 - 768)
    assert flops_per_token(model, 16) == 6 * (dense_params - 2 * 3 * 1280) + 12 * 2 * 32 * 16


@pytest.mark.parametrize("in_f,out_f,k", SHAPES)
def test_projection_of_a_monarch_matrix_is_exact(in_f, out_f, k):
    torch.manual_seed(1)
    matrix = MonarchLinear(in_f, out_f, k, bias=False).dense_weight()
    projected = MonarchLinear(in_f, out_f, k, bias=False)
    projected.blkdiag1.data, projected.blkdiag2.data = project_dense(matrix, k)
    assert (projected.dense_weight() - matrix).abs().max() < 1e-5


@pytest.mark.parametrize("in_f,out_f,k", [(16, 16, 4), (30, 50, 4), (64, 64, 8)])
def test_no_other_monarch_matrix_is_closer_to_a_dense_one(in_f, out_f, k):
    torch.manual_seed(2)
    dense = torch.randn(out_f, in_f)
    best = MonarchLinear(in_f, out_f, k, bias=False)
    best.blkdiag1.data, best.blkdiag2.data = project_dense(dense, k)
    best_error = (best.dense_weight() - dense).norm()
    assert best_error < dense.norm()
    other = MonarchLinear(in_f, out_f, k, bias=False)
    for _ in range(20):   # small moves of every factor around the projection, and unrelated Monarch matrices
        other.blkdiag1.data = best.blkdiag1.data + 0.05 * torch.randn_like(best.blkdiag1)
        other.blkdiag2.data = best.blkdiag2.data + 0.05 * torch.randn_like(best.blkdiag2)
        assert (other.dense_weight() - dense).norm() >= best_error
        other.reset_parameters()
        assert (other.dense_weight() - dense).norm() >= best_error


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def test_a_monarch_model_exports_as_a_stock_dense_model_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny()
    assert apply_monarch(model, nblocks=4, target_modules=["mlp"], init="random") == 2 * 3
    assert isinstance(model.model.layers[0].mlp.down_proj, MonarchLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear) and \
        isinstance(model.lm_head, torch.nn.Linear)
    ids = torch.randint(0, 300, (2, 12))
    fold_monarch(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, MonarchLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)

    # dense -> Monarch: projecting the exported dense model gives back the Monarch model's function exactly
    reprojected = AutoModelForCausalLM.from_pretrained(tmp_path)
    apply_monarch(reprojected, nblocks=4, target_modules=["mlp"], init="project")
    with torch.no_grad():
        assert torch.allclose(reprojected(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_monarch_recipe_resumes_with_the_uninterrupted_runs_losses_and_exports_dense(tmp_path, train_in_process):
    from transformers import AutoModelForCausalLM

    def losses(run_dir):
        return {l["step"]: l["loss"] for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in l}

    run = ["+recipe=monarch", "train.save_every=3", "scheduler=constant"]   # the same LR whatever max_steps says
    full, split = tmp_path / "full", tmp_path / "split"
    summary = train_in_process([*run, "train.max_steps=6"], full)
    assert train_in_process([*run, "train.max_steps=3"], split)["finished"]
    assert train_in_process([*run, "train.max_steps=6", "resume=auto"], split)["finished"]
    assert losses(split) == losses(full) and sorted(losses(full)) == list(range(1, 7))
    # tiny model: hidden 64, intermediate 128, 2 layers; 3 MLP matrices of 64x128 per layer at 4 blocks: 3072 each
    exported = AutoModelForCausalLM.from_pretrained(full / "final_model")
    dense_params = sum(p.numel() for p in exported.parameters())
    assert summary["total_params"] == dense_params - 2 * 3 * (8192 - 3072)
    assert json.loads((full / "final_model" / "effitrain_export.json").read_text())["merged"] is True
