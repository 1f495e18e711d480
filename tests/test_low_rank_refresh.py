"""Weight refactorization and momentum reset (2505.22922) on SLTrain's low-rank layers: what each one changes."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from effitrain.methods.low_rank_refresh import LowRankRefresh, low_rank_layers, refactorize
from effitrain.models.sltrain import apply_sltrain


def test_refactorize_keeps_the_product_and_balances_the_factors():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(48, 8, generator=g, dtype=torch.float64) * 100.0   # badly balanced: B large, A small
    A = torch.randn(8, 32, generator=g, dtype=torch.float64) / 100.0
    B2, A2 = refactorize(B, A)
    torch.testing.assert_close(B2 @ A2, B @ A)
    # balanced: B'ᵀB' = A'A'ᵀ = Σ (diagonal, the singular values of B·A)
    sigma = torch.linalg.svdvals(B @ A)[:8]
    torch.testing.assert_close(B2.T @ B2, torch.diag(sigma))
    torch.testing.assert_close(A2 @ A2.T, torch.diag(sigma))
    # before, the two sides were far apart
    assert torch.linalg.matrix_norm(B) / torch.linalg.matrix_norm(A) > 1e3
    torch.testing.assert_close(torch.linalg.matrix_norm(B2), torch.linalg.matrix_norm(A2))


def sltrain_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=96))
    apply_sltrain(model, rank=8, sparsity=0.03, alpha=2.0, target_modules=["self_attn", "mlp"])
    return model


def train_step(model, opt, step, seed=0):
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed + step))
    model(input_ids=x, labels=x).loss.backward()
    opt.step(); opt.zero_grad()


@pytest.mark.parametrize("reset_momentum", [True, False])
def test_hook_refactorizes_every_interval_without_changing_the_function(reset_momentum):
    model = sltrain_model()
    layers = low_rank_layers(model)
    assert layers
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = LowRankRefresh(interval=3, refactorize=True, reset_momentum=reset_momentum)
    state = NS(model=model, optimizer=opt, step=0, metrics={})
    hook.on_fit_start(state)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(99))
    for step in range(1, 4):
        train_step(model, opt, step)
        state.step = step
        if step == 3:
            with torch.no_grad():
                before = model(input_ids=x).logits
            B, A = layers[0].B.detach().clone(), layers[0].A.detach().clone()
            assert not torch.allclose(B.T @ B, A @ A.T, atol=1e-6)     # training left them unbalanced
        hook.on_step_end(state)
        if step < 3:                                                   # nothing between refreshes
            assert hook.refreshes == 0 and len(opt.state) == len(list(model.parameters()))
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)   # the same function
    B2, A2 = layers[0].B.detach(), layers[0].A.detach()
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(B2.T @ B2, A2 @ A2.T, rtol=1e-4, atol=1e-5)
    assert hook.refreshes == 1 and state.metrics["low_rank_refreshes"] == 1
    factors = {id(p) for layer in layers for p in (layer.B, layer.A)}
    if reset_momentum:
        assert len(opt.state) == 0                                    # a fresh AdamW
    else:                                                             # only the re-split factors lost their moments
        kept = {id(p) for p in opt.state}
        assert kept and not (kept & factors)
        assert kept == {id(p) for p in model.parameters()} - factors
    # training continues from the reset state (Adam starts again from step 1)
    train_step(model, opt, 4)
    assert int(opt.state[layers[0].B]["step"]) == 1


def test_momentum_reset_alone_clears_a_galore_optimizer_state():
    from effitrain.optim.galore import build_galore
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=96))
    params = NS(projector="svd", rank=8, update_proj_gap=200, refreshes_per_run=None, scale=0.25, lr=1e-2,
                weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-6, target_modules=["mlp"], state_bits=32,
                per_layer_updates=False)
    opt = build_galore(params, model)
    hook = LowRankRefresh(interval=2, refactorize=False, reset_momentum=True)
    state = NS(model=model, optimizer=opt, step=0, metrics={})
    hook.on_fit_start(state)
    for step in (1, 2):
        train_step(model, opt, step)
        state.step = step
        hook.on_step_end(state)
        assert (len(opt.state) == 0) == (step == 2)
    train_step(model, opt, 3)       # the next step draws a new subspace and new moments from scratch
    w = model.model.layers[0].mlp.up_proj.weight
    assert int(opt.state[w]["step"]) == 1


def test_both_off_and_refactorize_without_low_rank_layers_are_refused():
    from conftest import effitrain_cli
    from effitrain.config.blocks.methods_low_rank_refresh import LowRankRefreshParams
    from effitrain.registry import ConfigError
    with pytest.raises(ConfigError, match="both false"):
        LowRankRefreshParams(refactorize=False, reset_momentum=False).validate("methods.low_rank_refresh")
    refused = effitrain_cli("check", "+recipe=galore", "+methods.low_rank_refresh={}")
    assert refused.returncode == 2 and "refactorize_needs_low_rank" in refused.stderr
    assert "Traceback" not in refused.stderr
    allowed = effitrain_cli("check", "+recipe=galore", "+methods.low_rank_refresh.refactorize=false")
    assert allowed.returncode == 0, allowed.stderr


def test_a_reset_on_the_last_step_does_not_hide_the_optimizer_state(train_in_process, tmp_path):
    """The memory benchmark reads the optimizer state from the summary: with the momentum reset due on the last step
    (interval = max_steps) the state at the end is empty, yet the run held AdamW's moments for every trainable
    tensor in between -- the summary reports that (the larger of after-first-step and end)."""
    summary = train_in_process(["+recipe=low_rank_refresh", "methods.low_rank_refresh.interval=4"], tmp_path / "run")
    assert summary["optimizer_state_bytes_at_end"] == 0
    # AdamW keeps exp_avg and exp_avg_sq (plus a scalar step) per trainable tensor: at least 2 x 4 bytes a parameter
    assert summary["optimizer_state_bytes"] >= 8 * summary["trainable_params"]
