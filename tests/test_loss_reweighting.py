"""Dynamic loss-based sample reweighting (methods: {loss_reweighting: ...}): the paper's normalisation, weighting
functions and exp(f/r) softmax on hand-computed values; each function moves weight in the direction it is meant
to for a crafted batch of losses; the warm-up; the weights reaching weighted_causal_lm's loss from the same
forward; and the config errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.methods.loss_reweighting import LossReweighting, loss_weights, normalise_losses
from effitrain.registry import ConfigError

LOSSES = torch.tensor([1.0, 2.0, 3.0])  # normalised: -1, 0, 1


def _softmax(f: list[float], r: float = 1.0) -> list[float]:
    g = [math.exp((x - max(f)) / r) for x in f]
    return [x / sum(g) for x in g]


def test_losses_are_mapped_onto_minus_delta_to_delta_by_the_batch_min_and_max():
    assert normalise_losses(LOSSES).tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert normalise_losses(torch.tensor([2.0, 4.0, 2.5]), delta=2.0).tolist() == pytest.approx([-2.0, 2.0, -1.0])
    assert normalise_losses(torch.full((3,), 5.0)).tolist() == [0.0, 0.0, 0.0]  # equal losses: no spread, no NaN


@pytest.mark.parametrize("strategy, f", [("linupper", [0.0, 1.0, 1.0]),   # min(h + 1, 1)
                                         ("quadratic", [0.0, 1.0, 0.0]),  # 1 - h^2
                                         ("extremes", [1.0, 0.0, 1.0])])  # |h|
def test_weights_are_the_softmax_of_the_weighting_function_over_r(strategy, f):
    assert loss_weights(LOSSES, strategy=strategy, r=1.0).tolist() == pytest.approx(_softmax(f), rel=1e-6)
    assert loss_weights(LOSSES, strategy=strategy, r=0.4).tolist() == pytest.approx(_softmax(f, 0.4), rel=1e-6)


def test_each_function_moves_weight_the_way_the_paper_says_for_a_crafted_batch():
    losses = torch.tensor([0.5, 2.0, 2.1, 2.2, 6.0])  # one very easy, three typical, one very hard example
    uniform = 1 / 5
    lin = loss_weights(losses, strategy="linupper", r=1.0)
    assert lin[0] < uniform and lin[0] == lin.min() and lin[4] == lin.max()  # the easiest loses the most
    quad = loss_weights(losses, strategy="quadratic", r=1.0)
    assert quad[0] < uniform and quad[4] < uniform and quad[1:4].min() > uniform  # both ends lose to the middle
    ext = loss_weights(losses, strategy="extremes", r=1.0)
    assert ext[0] > uniform and ext[4] > uniform and ext[1:4].max() < uniform  # both ends gain
    nearly_uniform = loss_weights(losses, strategy="linupper", r=1e6)
    assert nearly_uniform.tolist() == pytest.approx([uniform] * 5, rel=1e-5)  # r -> infinity: no reweighting


def _state(step: int, max_steps: int = 100) -> SimpleNamespace:
    return SimpleNamespace(step=step, batch={}, spec=SimpleNamespace(train=SimpleNamespace(max_steps=max_steps)))


def test_no_weights_during_the_warmup_then_weights_from_the_forwards_losses():
    hook = LossReweighting(strategy="linupper", r=1.0, delta=1.0, warmup_fraction=0.05)
    hook.on_fit_start(_state(0, max_steps=100))
    assert hook.warmup_steps == 5
    early, late = _state(4), _state(5)
    hook.on_batch_start(early)
    hook.on_batch_start(late)
    assert "example_weights" not in early.batch  # the objective's default weight: the plain mean
    assert late.batch["example_weights"](LOSSES).tolist() == pytest.approx(_softmax([0.0, 1.0, 1.0]), rel=1e-6)


def test_the_weighted_objective_minimises_the_reweighted_loss_of_its_own_forward():
    """A tiny Llama: the loss weighted_causal_lm returns with the method's weights is sum w_i l_i / sum w_i with the
    weights computed from the very losses of that forward, and its gradient is that of the weighted sum."""
    import transformers

    from effitrain.objectives.weighted import WeightedCausalLM, example_losses

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    hook = LossReweighting(strategy="extremes", r=0.5, delta=1.0, warmup_fraction=0.0)
    hook.on_fit_start(_state(0))
    state = _state(0)
    state.batch = {"input_ids": ids, "labels": ids}
    hook.on_batch_start(state)
    loss, metrics = WeightedCausalLM(default_weight=1.0)(model, state.batch, state)
    own = example_losses(model(input_ids=ids).logits, ids)
    w = loss_weights(own, strategy="extremes", r=0.5)
    assert not torch.allclose(w, torch.full((4,), 0.25))  # the batch's losses differ: the weights are not uniform
    assert torch.allclose(loss, (w * own).sum(), atol=1e-6)  # the weights sum to 1
    assert torch.allclose(metrics["unweighted_loss"], own.mean(), atol=1e-6)
    loss.backward()  # the weights are constants: the gradient is sum_i w_i grad l_i
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    (w.detach() * example_losses(model(input_ids=ids).logits, ids)).sum().backward()
    assert torch.allclose(grad, model.lm_head.weight.grad, atol=1e-6)


def test_the_method_without_the_weighted_objective_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^incompatible configuration \[loss_reweighting_needs_weighted_objective\]"
                                          r": methods.loss_reweighting sets per-example weights that objective "
                                          r"'causal_lm' ignores; use objective=weighted_causal_lm$"):
        composed = compose_config(["+recipe=loss_reweighting", "objective=causal_lm"])
        validate(composed.cfg, composed.recipes)
    with pytest.raises(ConfigError, match=r"methods.loss_reweighting.strategy"):
        composed = compose_config(["+recipe=loss_reweighting", "methods.loss_reweighting.strategy=cubic"])
        validate(composed.cfg, composed.recipes)
