"""Structured FFN layers and self-guided training (peft=structured_ffn, methods.self_guided; Wei et al. 2406.16450).

The mechanism: each structure has the declared parameters and multiply-adds and is a dense layer with its effective
matrix; the authors' initialisations hold (balanced truncated SVD, orthogonal blocks); the guide starts equal to the
structured matrix, mixes in as alpha·G + (1-alpha)·S, decays on the authors' schedule and is then not computed; its
FLOPs are counted only when it runs; a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import effitrain_cli, sigterm_after_step
from effitrain.models.structured_ffn import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, SelfGuided,
                                             StructuredFFNLinear, apply_structured_ffn, fold_structured,
                                             guide_weight, make_structured)


def _layers():
    torch.manual_seed(0)
    # 64 -> 128: lowrank r=16: 16*64 + 128*16; blockdense r=16, 4 blocks: 4*(4*16) + 128*16; blockshuffle 4 blocks:
    # blocks of 16 inputs and 32 outputs, inner 16: 4*16*16 + 4*32*16
    return {"lowrank": (LowRankLinear(64, 128, 16), 3072), "blockdense": (BlockDenseLinear(64, 128, 16, 4), 2304),
            "blockshuffle": (BlockShuffleLinear(64, 128, 4), 3072)}


@pytest.mark.parametrize("kind", ["lowrank", "blockdense", "blockshuffle"])
def test_each_structure_has_its_declared_parameters_and_flops(kind):
    from torch.utils.flop_counter import FlopCounterMode

    layer, weights = _layers()[kind]
    assert sum(p.numel() for p in layer.parameters()) - layer.bias.numel() == weights
    with FlopCounterMode(display=False) as counter:
        layer.structured(torch.randn(10, 64))
    assert counter.get_total_flops() == 2 * 10 * weights      # one multiply-add per weight per token


@pytest.mark.parametrize("kind", ["lowrank", "blockdense", "blockshuffle"])
def test_each_structure_is_the_dense_layer_of_its_effective_matrix(kind):
    layer, _ = _layers()[kind]
    wrapped = StructuredFFNLinear(layer, guide=False)
    with torch.no_grad():
        layer.bias.normal_()
    dense = torch.nn.Linear(64, 128)
    dense.weight.data, dense.bias.data = layer.effective_weight().detach().clone(), layer.bias.detach().clone()
    x = torch.randn(3, 7, 64)
    assert torch.allclose(wrapped(x), dense(x), atol=1e-5)


def test_the_authors_initialisations():
    layers = _layers()
    low = layers["lowrank"][0]
    # truncated SVD split as sqrt(S): lr1 lr1^T = lr2^T lr2 = diag(S_r), a balanced factorisation
    left, right = low.lr1 @ low.lr1.T, low.lr2.T @ low.lr2
    assert torch.allclose(left, right, atol=1e-4) and torch.allclose(left, torch.diag(torch.diag(left)), atol=1e-4)
    # orthogonalised blocks: every singular value is one
    for blocks in (layers["blockdense"][0].blkdiag, layers["blockshuffle"][0].blkdiag1,
                   layers["blockshuffle"][0].blkdiag2):
        for block in blocks:
            assert torch.allclose(torch.linalg.svdvals(block), torch.ones(min(block.shape)), atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(layers["blockdense"][0].lr), torch.ones(16), atol=1e-5)


def test_the_guide_starts_as_the_structured_matrix_and_mixes_by_alpha():
    torch.manual_seed(1)
    layer = make_structured(torch.nn.Linear(32, 48), "lowrank", rank=8, nblocks=4, guide=True, rank_ratio=None)
    x = torch.randn(5, 32)
    structured = layer.inner.structured(x) + layer.inner.bias
    assert torch.allclose(layer(x), structured, atol=1e-5)            # alpha = 1 and G = S: the same function
    with torch.no_grad():
        layer.guide.add_(torch.randn_like(layer.guide))
    layer.set_alpha(0.3)
    assert torch.allclose(layer(x), 0.3 * (x @ layer.guide.T) + 0.7 * layer.inner.structured(x) + layer.inner.bias,
                          atol=1e-5)
    assert torch.allclose(layer.effective_weight(), 0.3 * layer.guide + 0.7 * layer.inner.effective_weight())
    layer.set_alpha(0.0)
    assert torch.allclose(layer(x), structured, atol=1e-5)            # decayed: the guide is out of the function
    layer(x).sum().backward()
    assert layer.guide.grad is None                                   # ... and out of the graph


def test_alpha_follows_the_authors_decay():
    assert guide_weight(0, 100, "cosine") == 1.0
    assert guide_weight(50, 100, "cosine") == pytest.approx(0.5)
    assert guide_weight(25, 100, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert guide_weight(25, 100, "linear") == pytest.approx(0.75)
    assert guide_weight(100, 100, "cosine") == 0.0 and guide_weight(400, 100, "linear") == 0.0


def _guided_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    apply_structured_ffn(model, kind="lowrank", rank=8, rank_ratio=None, nblocks=4, guide=True,
                         target_modules=["mlp"], seed=0)
    return model


def test_the_hook_draws_guide_use_with_probability_alpha_and_counts_only_what_ran():
    model = _guided_model()
    state = SimpleNamespace(model=model, spec=SimpleNamespace(train=SimpleNamespace(max_steps=400)), step=0,
                            micro_step=0, tokens=0, metrics={})
    hook = SelfGuided(steps_ratio=0.5, schedule="linear", reduce_flop=True, seed=3)
    hook.on_fit_start(state)
    assert hook.guided_steps == 200
    layers = [m for m in model.modules() if isinstance(m, StructuredFFNLinear)]
    guide_params = layers[0].guide.numel()                    # every MLP matrix is 32x64 or 64x32
    expected_flops, used_at_half = 0.0, []
    for step in range(260):
        state.step = state.micro_step = step                  # one micro-batch per step
        hook.on_batch_start(state)
        used = [layer.use_guide and layer._alpha > 0 for layer in layers]
        if 90 <= step < 110:
            used_at_half += used                              # alpha ~ 0.5 around step 100
        state.tokens += 1000
        hook.on_step_end(state)
        expected_flops += 6 * guide_params * sum(used) * 1000
    assert hook.flops == expected_flops and hook.extra_flops(state) == expected_flops
    assert 0.3 < sum(used_at_half) / len(used_at_half) < 0.7
    assert not any(used) and layers[0]._alpha == 0.0          # past step 200: no guide at all
    replay = SelfGuided(steps_ratio=0.5, schedule="linear", reduce_flop=True, seed=3)
    replay.on_fit_start(state)
    assert replay.guide_use(100, 0.5) == hook.guide_use(100, 0.5)   # a resumed run draws the same


def test_with_accumulation_each_micro_batch_draws_its_own_guide_use_and_is_charged_its_share():
    # the authors' forward pass draws the guide's use for every batch it runs: with 4 accumulated micro-batches one
    # optimizer step mixes different layers' guides in different micro-batches (one draw per step did not)
    model = _guided_model()
    state = SimpleNamespace(model=model, spec=SimpleNamespace(train=SimpleNamespace(max_steps=400)), step=100,
                            micro_step=400, tokens=100 * 4000, metrics={})
    hook = SelfGuided(steps_ratio=0.5, schedule="linear", reduce_flop=True, seed=3)
    hook.on_fit_start(state)
    layers = [m for m in model.modules() if isinstance(m, StructuredFFNLinear)]
    draws = []
    for micro in range(4):                                     # alpha = 0.5 at step 100 of 200
        state.micro_step = 400 + micro
        hook.on_batch_start(state)
        draws.append([layer.use_guide for layer in layers])
        assert draws[-1] == hook.guide_use(400 + micro, 0.5)  # a function of (seed, micro-batch number)
    assert len({tuple(d) for d in draws}) > 1
    state.tokens += 4000
    hook.on_step_end(state)
    guide_params = layers[0].guide.numel()
    assert hook.flops == pytest.approx(6 * guide_params * sum(map(sum, draws)) / 4 * 4000)
    per_step = SelfGuided(steps_ratio=0.5, schedule="linear", reduce_flop=True, seed=3, draw_every="step")
    per_step.on_fit_start(state)
    seen = []
    for micro in range(4):
        state.micro_step = 404 + micro
        per_step.on_batch_start(state)
        seen.append(tuple(layer.use_guide for layer in layers))
    assert len(set(seen)) == 1


def test_the_first_blocks_ffn_stays_dense_as_in_every_authors_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    replaced = apply_structured_ffn(model, kind="lowrank", rank=8, rank_ratio=None, nblocks=4, guide=True,
                                    target_modules=["mlp"], seed=0, first_layer_dense=True)
    assert replaced == 2 * 3                                   # gate, up, down of blocks 1 and 2
    projections = ("gate_proj", "up_proj", "down_proj")
    assert all(type(getattr(model.model.layers[0].mlp, p)) is torch.nn.Linear for p in projections)
    assert all(isinstance(getattr(layer.mlp, p), StructuredFFNLinear) for layer in model.model.layers[1:]
               for p in projections)


def test_the_guide_is_left_out_of_the_6n_count():
    from effitrain.engine.metrics import flops_per_token

    model = _guided_model()
    guides = sum(m.guide.numel() for m in model.modules() if isinstance(m, StructuredFFNLinear))
    everything = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 16) == 6 * (everything - guides) + 12 * 2 * 32 * 16


def test_export_is_a_dense_model_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _guided_model()
    for layer in (m for m in model.modules() if isinstance(m, StructuredFFNLinear)):
        with torch.no_grad():
            layer.guide.add_(0.1 * torch.randn_like(layer.guide))
        layer.set_alpha(0.4)
    ids = torch.randint(0, 300, (2, 10))
    fold_structured(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("args, expected", [
    (["peft=structured_ffn"], "methods.self_guided"),
    (["+methods.self_guided={}"], "peft=none"),
])
def test_a_guide_and_its_decay_come_together(args, expected):
    result = effitrain_cli("check", *args)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_structured_ffn_stopped_while_the_guide_decays_resumes_exactly(tmp_path, train_in_process):
    """Eight steps, the guide decaying over the first four (reduce_flop draws included); the second run is stopped by
    SIGTERM after step 2, saves, and `resume=auto` finishes it: every loss, alpha and the guides' FLOPs are the
    uninterrupted run's; the export is a dense model."""
    run = ["+recipe=structured_ffn", "scheduler=constant", "train.max_steps=8"]

    def lines(run_dir):
        return {l["step"]: (l["loss"], l["guide_alpha"]) for l in
                map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    summary = train_in_process(run, full)
    with sigterm_after_step(2):
        assert not train_in_process(run, split)["finished"]
    resumed = train_in_process([*run, "resume=auto"], split)
    assert lines(split) == lines(full) and sorted(lines(full)) == list(range(1, 9))
    assert [alpha for _, alpha in lines(full).values()][-4:] == [0.0] * 4      # decayed after half of the steps
    assert resumed["flops"] == summary["flops"]
    # the guides ran (reduce_flop: each in a step with probability alpha), at most in every step of the first half:
    # the tiny model's 2 layers x 3 guides of 64x128
    assert 0 < summary["flops_methods"] < 6 * (2 * 3 * 64 * 128) * summary["tokens"] / 2
    assert json.loads((full / "final_model" / "effitrain_export.json").read_text())["merged"] is True


@pytest.mark.parametrize("args, expected", [
    (["+recipe=structured_ffn", "peft.kind=blockdense", "peft.nblocks=3"], "peft.nblocks: blockdense needs"),
    (["+recipe=monarch", "peft.nblocks=500"], "peft.nblocks: 500 is outside"),
])
def test_a_block_count_the_layers_cannot_take_is_refused_before_the_run_starts(tmp_path, args, expected):
    from conftest import TINY

    result = effitrain_cli(*TINY, *args, f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
