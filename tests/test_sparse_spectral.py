"""Sparse Spectral Training (2405.15481): W = U diag(S) V^T from the SVD; every singular value and r sampled vector
pairs trained per round, drawn in proportion to the singular values; a re-SVD ends each round."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import sigterm_after_step
from effitrain.config.compose import compose_config
from effitrain.config.rules import Environment, check_rules
from effitrain.config.spec import validate
from effitrain.models.sparse_spectral import SparseSpectral, SpectralLinear, apply_sparse_spectral, svd_flops
from effitrain.registry import ConfigError

OUT, IN = 24, 32


def _layer(rank=4, enhanced=True, seed=0) -> tuple[nn.Linear, SpectralLinear]:
    torch.manual_seed(seed)
    dense = nn.Linear(IN, OUT)
    return dense, SpectralLinear(dense, rank=rank, seed=seed, index=0, enhanced_gradient=enhanced)


def test_the_layer_starts_as_the_dense_layer_it_replaces_and_is_always_a_linear_of_U_S_Vt():
    dense, layer = _layer()
    x = torch.randn(5, IN)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)
    with torch.no_grad():  # any values of the factors: still the linear map of U diag(S) V^T (sampled columns in)
        layer.S.mul_(torch.linspace(0.5, 2, layer.full_rank))
        layer.U_sampled.add_(0.1 * torch.randn_like(layer.U_sampled))
    u, v = layer.U.clone(), layer.V.clone()
    u[:, layer.sampled], v[:, layer.sampled] = layer.U_sampled, layer.V_sampled
    assert torch.allclose(layer(x), x @ (u @ torch.diag(layer.S) @ v.T).T + dense.bias, atol=1e-5)
    assert layer.full_rank == min(IN, OUT) == 24 and layer.sampled.tolist() == sorted(set(layer.sampled.tolist()))


def test_a_step_changes_every_singular_value_and_only_the_sampled_vectors():
    _, layer = _layer(rank=4)
    u0, v0 = (f.detach().clone() for f in layer.factors())
    s0 = layer.S.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(16, IN)).pow(2).mean().backward()
    optimizer.step()
    u1, v1 = (f.detach() for f in layer.factors())
    sampled = layer.sampled.tolist()
    rest = [i for i in range(layer.full_rank) if i not in sampled]
    assert torch.equal(u1[:, rest], u0[:, rest]) and torch.equal(v1[:, rest], v0[:, rest])  # exactly untouched
    assert all(not torch.equal(u1[:, i], u0[:, i]) and not torch.equal(v1[:, i], v0[:, i]) for i in sampled)
    assert bool((layer.S.detach() != s0).all())                                               # all of S trained
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 24 + 4 * (OUT + IN) + OUT  # S, U_r, V_r, b


def test_the_draw_is_without_replacement_and_proportional_to_the_singular_values():
    _, layer = _layer(rank=1)
    with torch.no_grad():
        layer.S.copy_(torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0] + [0.0] * 19))
    counts = torch.bincount(torch.cat([layer.draw(r) for r in range(4000)]), minlength=24).double()
    expected = 4000 * torch.tensor([8, 4, 2, 1, 1] + [0] * 19, dtype=torch.float64) / 16
    assert counts[5:].sum() == 0                                       # a zero singular value is never drawn
    chi_square = float(((counts[:5] - expected[:5]) ** 2 / expected[:5]).sum())
    assert chi_square < 18.5                                           # 4 degrees of freedom, p = 0.001
    _, wide = _layer(rank=10)
    draw = wide.draw(3)
    assert len(set(draw.tolist())) == 10 and torch.equal(draw, wide.draw(3))  # distinct; (seed, layer, round) fixes it


@pytest.mark.parametrize("enhanced", [True, False])
def test_the_enhanced_gradient_drops_the_singular_value_factor(enhanced):
    """For L = <W, G>, dL/dW = G; U's column i gets G V_i times sigma_i by the chain rule, G V_i enhanced."""
    _, layer = _layer(rank=4, enhanced=enhanced)
    target = torch.randn(OUT, IN)
    (layer.dense_weight() * target).sum().backward()
    v_sampled = layer.V_sampled.detach()
    sigma = layer.S.detach()[layer.sampled]
    by_hand = target @ v_sampled
    assert torch.allclose(layer.U_sampled.grad, by_hand if enhanced else by_hand * sigma, atol=1e-5)


def test_redecomposition_restores_orthonormal_factors_keeps_W_and_draws_anew():
    _, layer = _layer(rank=4)
    with torch.no_grad():  # training moves the sampled vectors off the orthonormal frame
        layer.U_sampled.add_(0.2 * torch.randn_like(layer.U_sampled))
        layer.V_sampled.add_(0.2 * torch.randn_like(layer.V_sampled))
    u, v = layer.factors()
    assert not torch.allclose(u.T @ u, torch.eye(24), atol=1e-3)
    before = layer.dense_weight().detach().clone()
    layer.redecompose()
    u, v = layer.factors()
    assert torch.allclose(u.T @ u, torch.eye(24), atol=1e-5) and torch.allclose(v.T @ v, torch.eye(24), atol=1e-5)
    assert torch.allclose(layer.dense_weight(), before, atol=1e-5)
    assert bool((layer.S[:-1] >= layer.S[1:]).all()) and layer.rounds == 1
    assert torch.equal(layer.sampled, layer.draw(1))


def _hooked(layer, **hook_args):
    model = nn.Sequential(layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = SparseSpectral(**hook_args)
    state = SimpleNamespace(model=model, optimizer=optimizer, step=0, metrics={}, tokens=0, micro_step=0,
                            world_size=1)
    hook.on_fit_start(state)
    return model, optimizer, hook, state


def _train_step(model, optimizer, hook, state, loss_fn=lambda y: y.pow(2).mean()):
    loss_fn(model(torch.randn(8, IN))).backward()
    optimizer.step()
    optimizer.zero_grad()
    state.step += 1
    state.tokens, state.micro_step = 8 * state.step, state.step
    hook.on_step_end(state)


def _orthonormal(layer) -> bool:
    u, v = layer.factors()
    eye = torch.eye(layer.full_rank)
    return torch.allclose(u.T @ u, eye, atol=1e-4) and torch.allclose(v.T @ v, eye, atol=1e-4)


def test_after_every_step_the_trained_vectors_have_unit_length_and_no_singular_value_is_negative():
    _, layer = _layer(rank=4)
    model, optimizer, hook, state = _hooked(layer, interval=1000)
    with torch.no_grad():  # the smallest singular values sit just above 0, where a step pushes some of them below
        layer.S[12:] = 1e-3
    optimizer.param_groups[0]["lr"] = 0.05
    drifted = negative = 0
    for _ in range(5):
        loss_fn = lambda y: -(y * y.detach().sign()).mean() + y.pow(2).mean()
        loss_fn(model(torch.randn(8, IN))).backward()
        optimizer.step()
        optimizer.zero_grad()
        # what the optimizer left: vectors off unit length, singular values below 0 (so the checks below can fail)
        drifted += int(not torch.allclose(layer.U_sampled.norm(dim=0), torch.ones(4), atol=1e-4))
        negative += int(bool((layer.S < 0).any()))
        state.step += 1
        hook.on_step_end(state)
        for factor in (layer.U_sampled, layer.V_sampled):
            assert torch.allclose(factor.norm(dim=0), torch.ones(4), atol=1e-6)
        assert bool((layer.S >= 0).all())
    assert drifted == 5 and negative >= 1


@pytest.mark.parametrize("sigma", [-1e-3, 0.0, 1e-30])
def test_a_singular_value_at_or_below_zero_gets_the_finite_hand_derived_gradient(sigma):
    """Enhanced: dL/dU_i = G V_i and dL/dV_i = G^T U_i whatever sigma_i is; dL/dS_i = U_i^T G V_i."""
    _, layer = _layer(rank=4)
    with torch.no_grad():
        layer.S[layer.sampled[0]] = sigma
    target = torch.randn(OUT, IN)
    (layer.dense_weight() * target).sum().backward()
    u, v = (f.detach() for f in layer.factors())
    for grad in (layer.U_sampled.grad, layer.V_sampled.grad, layer.S.grad):
        assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(layer.U_sampled.grad, target @ v[:, layer.sampled])
    torch.testing.assert_close(layer.V_sampled.grad, target.T @ u[:, layer.sampled])
    torch.testing.assert_close(layer.S.grad, torch.diagonal(u.T @ target @ v))


def test_a_new_draw_every_interval_and_a_re_svd_only_at_the_end_of_each_round():
    _, layer = _layer(rank=4)   # k = 24, r = 4: a round is ceil(24 / 4) = 6 intervals by default
    model, optimizer, hook, state = _hooked(layer, interval=2)
    assert hook.round_length(layer) == 6
    samples, events = [layer.sampled.clone()], {}
    for step in range(1, 15):
        _train_step(model, optimizer, hook, state)
        changed = not torch.equal(layer.sampled, samples[-1])
        samples.append(layer.sampled.clone())
        events[step] = ("re-svd" if _orthonormal(layer) else "draw" if changed else "-")
        vectors_kept_state = layer.U_sampled in optimizer.state and layer.V_sampled in optimizer.state
        assert vectors_kept_state == (step % 2 != 0)          # dropped whenever the vectors are new columns
        assert (layer.S in optimizer.state) == (step != 12)     # S keeps its moments, except at the re-SVD
    expected = {s: "re-svd" if s == 12 else "draw" if s % 2 == 0 else "-" for s in range(1, 15)}
    assert events == expected
    assert layer.draws == hook.intervals == 7 and layer.rounds == 1 and state.metrics["spectral_rounds"] == 1
    assert torch.equal(layer.sampled, layer.draw(7))            # the draw number seeds the draw: resumable
    per_token, per_micro_batch = 6 * OUT * IN, 6 * OUT * IN * 24
    assert svd_flops(OUT, IN) == 14 * 32 * 24 ** 2 + 8 * 24 ** 3
    assert hook.extra_flops(state) == per_token * 8 * 14 + per_micro_batch * 14 + svd_flops(OUT, IN) * 2


def test_intervals_per_round_sets_the_re_svd_cadence_and_a_resumed_hook_keeps_it():
    _, layer = _layer(rank=4)
    model, optimizer, hook, state = _hooked(layer, interval=1, intervals_per_round=3)
    resvd = []
    for step in range(1, 8):
        _train_step(model, optimizer, hook, state)
        if _orthonormal(layer):
            resvd.append(step)
    assert resvd == [3, 6] and layer.rounds == 2
    again = SparseSpectral(interval=1, intervals_per_round=3)
    again.on_fit_start(SimpleNamespace(model=model, optimizer=optimizer))
    again.load_state_dict(hook.state_dict())
    assert layer.draws == 7 and layer.rounds == 2 and again.intervals == 7


def test_a_rank_above_a_layers_smaller_side_names_the_key():
    model = nn.Sequential(nn.Linear(IN, OUT))
    with pytest.raises(ConfigError, match=r"peft.rank: 30 singular-vector pairs cannot be drawn from a 24x32 layer"):
        apply_sparse_spectral(model, rank=30, target_modules=["0"], seed=0)


@pytest.mark.parametrize("overrides, message", [
    (["peft=sparse_spectral"], r"\[sparse_spectral_pairs\]: peft=sparse_spectral trains the vectors of one draw"),
    (["+recipe=sparse_spectral", "parallelism=zero2"], r"\[sparse_spectral_rewrites_its_factors\].*ZeRO stage 2"),
    (["+recipe=sparse_spectral", "precision=bf16"], r"\[sparse_spectral_rewrites_its_factors\].*precision=bf16"),
])
def test_what_would_silently_break_the_rounds_is_refused(overrides, message):
    composed = compose_config(overrides)
    with pytest.raises(ConfigError, match=message):
        check_rules(validate(composed.cfg, composed.recipes), Environment(device_type="cpu", world_size=1))


@pytest.mark.slow
def test_sparse_spectral_stopped_mid_run_resumes_with_the_same_draws_and_exports_dense(tmp_path, train_in_process):
    from transformers import AutoModelForCausalLM

    run = ["+recipe=sparse_spectral", "peft.rank=8", "methods.sparse_spectral.interval=1",
           "methods.sparse_spectral.intervals_per_round=2", "train.max_steps=6"]

    def lines(run_dir):
        return {l["step"]: l["loss"] for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    summary = train_in_process(run, full)
    with sigterm_after_step(3):   # mid-round: the third draw and the re-SVD of step 2 come back from the checkpoint
        assert not train_in_process(run, split)["finished"]
    resumed = train_in_process([*run, "resume=auto"], split)
    assert lines(split) == lines(full) and sorted(lines(full)) == [1, 2, 3, 4, 5, 6]
    assert resumed["flops"] == summary["flops"] and summary["flops_methods"] > 0
    export = json.loads((full / "final_model" / "effitrain_export.json").read_text())
    assert export["merged"] is True
    dense = AutoModelForCausalLM.from_pretrained(full / "final_model")
    assert not any("U_sampled" in name for name, _ in dense.named_parameters())
