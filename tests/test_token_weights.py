"""Per-token loss weights (issue #27, item 3): GRPO's and SFT's loss as ``sum_t w_t l_t``.

What holds: the weights of each GRPO ``loss_type`` reproduce its loss; decoupled GRPO (Thinkless) equals a
hand-computed value on a 2-sample batch, and its control token's gradient does not shrink with the response's
length where GRPO's does; a method's weights reach GRPO's loss through the batch, clash with the objective's own
and are checked for shape; SFT's weights give the hand-computed weighted sum and its default stays the mean; bad
settings are refused at check.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from effitrain.config.blocks import load_builtin_blocks
from effitrain.errors import RunFailed
from effitrain.objectives import grpo, sft
from effitrain.objectives.common import TOKEN_WEIGHTS
from effitrain.objectives.token_weights import DecoupledControl, normalisation_weights
from effitrain.registry import REGISTRY, ConfigError
from test_grpo import _prompt_batch, tiny_llama, tokenizer  # noqa: F401 (tokenizer: the fixture)

load_builtin_blocks()

KW = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2)


def _case(seed=0, n=4, width=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, width, generator=g) - 0.1
    old = logps + 0.3 * (torch.rand(n, width, generator=g) - 0.5)
    ref = logps + 0.2 * (torch.rand(n, width, generator=g) - 0.5)
    adv = torch.randn(n, generator=g)
    lengths = torch.tensor([1, 3, width, 4])[:n]
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_each_loss_types_normalisation_is_a_set_of_token_weights(loss_type):
    logps, old, ref, adv, mask = _case()
    extra = dict(max_new_tokens=8, global_tokens=40.0, world_size=2)
    default, _ = grpo.grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, **{**KW, "beta": 0.04}, **extra)
    weights = normalisation_weights(mask, loss_type, **extra)
    weighted, _ = grpo.grpo_loss(logps, old, ref, adv, mask, loss_type="grpo", token_weights=weights,
                                 **{**KW, "beta": 0.04})
    assert weighted.item() == pytest.approx(default.item(), rel=1e-6)


def test_decoupled_loss_equals_the_hand_computed_value_on_two_samples():
    """Two completions: <control> + 1 response token, and <control> + 3; ratio != 1, KL on.  The paper's
    formula: 1/N sum_i [alpha l_i0 + 1/T_i sum_{t>=1} l_it]; the authors' code: alpha * mean_i l_i0 + the token
    mean of the response tokens."""
    logps = torch.tensor([[-1.0, -0.5, 0.0, 0.0], [-2.0, -0.3, -0.7, -1.2]])
    old = torch.tensor([[-1.1, -0.4, 0.0, 0.0], [-1.5, -0.3, -0.9, -1.0]])
    ref = torch.tensor([[-0.9, -0.6, 0.0, 0.0], [-2.1, -0.2, -0.7, -1.4]])
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    beta, alpha, eps = 0.1, 0.25, 0.2

    def token(i, t):  # -min(r A, clip(r) A) + beta k3, written out
        r = float(torch.exp(logps[i, t] - old[i, t]))
        a = float(adv[i])
        clipped = min(max(r, 1 - eps), 1 + eps)
        delta = float(ref[i, t] - logps[i, t])
        return -min(r * a, clipped * a) + beta * (float(torch.exp(torch.tensor(delta))) - delta - 1)

    paper = 0.5 * ((alpha * token(0, 0) + token(0, 1))
                   + (alpha * token(1, 0) + (token(1, 1) + token(1, 2) + token(1, 3)) / 3))
    authors = alpha * (token(0, 0) + token(1, 0)) / 2 + (token(0, 1) + token(1, 1) + token(1, 2) + token(1, 3)) / 4
    for response, expected in (("sequence", paper), ("token", authors)):
        weights = DecoupledControl(alpha, response)(torch.zeros_like(mask), mask)
        loss, _ = grpo.grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon_low=eps, epsilon_high=eps,
                                 token_weights=weights)
        assert loss.item() == pytest.approx(expected, rel=1e-6), response
    assert paper != pytest.approx(authors)  # the two normalisations differ on this batch


def test_the_control_tokens_gradient_does_not_shrink_with_the_response_length():
    """The failure DeGRPO fixes: under GRPO's per-completion mean a control token followed by T response tokens
    weighs 1 / (N (T + 1)), so a long (thinking) answer's mode choice gets a T-times smaller gradient than a short
    one's with the same |advantage|; decoupled, both get alpha * A / N."""
    short, long_ = 2, 12
    width = long_ + 1
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor([[short + 1], [long_ + 1]])).long()
    adv = torch.tensor([1.0, -1.0])

    def control_grads(weights):
        logps = torch.full((2, width), -0.5, requires_grad=True)
        loss, _ = grpo.grpo_loss(logps, logps.detach(), None, adv, mask, token_weights=weights, **KW)
        loss.backward()
        return logps.grad[:, 0].abs()

    grpo_grads = control_grads(None)
    assert grpo_grads[0].item() == pytest.approx(1 / (2 * (short + 1)))
    assert grpo_grads[1].item() == pytest.approx(1 / (2 * (long_ + 1)))        # 13/3 times smaller
    alpha = 0.001
    decoupled = control_grads(DecoupledControl(alpha)(torch.zeros_like(mask), mask))
    assert decoupled[0].item() == pytest.approx(alpha / 2) and decoupled[1].item() == pytest.approx(alpha / 2)
    # ... while each completion's response tokens together still weigh 1/N, whatever their number
    weights = DecoupledControl(alpha)(torch.zeros_like(mask), mask)
    assert weights[:, 1:].sum(-1).tolist() == pytest.approx([0.5, 0.5])


def _grpo_objective(tokenizer, **kwargs):
    digit_share = lambda r, ref, n: [sum(ch.isdigit() for ch in x) / max(len(x), 1) for x in r]  # noqa: E731
    return grpo.GRPO(tokenizer, [("digits", 1.0, digit_share)], None, group_size=4, max_new_tokens=5,
                     temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=None, scale_rewards="group",
                     loss_type="grpo", seed=3, **kwargs)


def test_a_methods_token_weights_reach_grpos_loss_and_clash_with_the_objectives_own(tokenizer):  # noqa: F811
    tok = tokenizer
    model = tiny_llama(len(tok), seed=5)
    state = SimpleNamespace(step=0, micro_step=0, rank=0)
    seen = {}

    def only_first_tokens(completions, mask):
        seen["shape"] = tuple(mask.shape)
        w = torch.zeros(mask.shape)
        w[:, 0] = 1.0
        return w

    batch, _ = _prompt_batch(tok)
    plain, _ = _grpo_objective(tok)(model, dict(batch), state)
    weighted, _ = _grpo_objective(tok)(model, {**batch, TOKEN_WEIGHTS: only_first_tokens}, state)
    assert seen["shape"][0] == 2 * 4
    # by hand on the same samples: the sum of the first tokens' -A (ratio 1, no KL)
    obj = _grpo_objective(tok, iterations=2)
    obj(model, dict(batch), state)
    e = obj.samples[0]
    assert weighted.item() == pytest.approx(-e["advantages"].sum().item(), abs=1e-6)
    assert weighted.item() != pytest.approx(plain.item())
    with pytest.raises(RunFailed, match="decoupled_alpha"):
        _grpo_objective(tok, token_weighting=DecoupledControl(0.1))(model, {**batch, TOKEN_WEIGHTS: only_first_tokens},
                                                                    state)
    with pytest.raises(RunFailed, match="expected"):
        _grpo_objective(tok)(model, {**batch, TOKEN_WEIGHTS: lambda c, m: torch.ones(3)}, state)


def test_the_decoupled_weights_are_kept_with_reused_samples(tokenizer):  # noqa: F811
    """iterations > 1: the cycle's later steps use the weights of its samples (saved with them in a checkpoint)."""
    tok = tokenizer
    model = tiny_llama(len(tok), seed=5)
    obj = _grpo_objective(tok, iterations=2, token_weighting=DecoupledControl(0.5, "token"))
    batch, _ = _prompt_batch(tok)
    first, _ = obj(model, dict(batch), SimpleNamespace(step=0, micro_step=0, rank=0))
    e = obj.samples[0]
    assert torch.equal(e["token_weights"], DecoupledControl(0.5, "token")(e["ids"], e["mask"]))
    restored = _grpo_objective(tok, iterations=2, token_weighting=DecoupledControl(0.5, "token"))
    restored.load_state_dict(obj.state_dict())
    again, _ = restored(model, dict(batch), SimpleNamespace(step=1, micro_step=1, rank=0))
    assert again.item() == pytest.approx(first.item(), rel=1e-6)  # same weights (the model has not moved)


# ---------------------------------------------------------------------------------------------------------- SFT

def _sft_case():
    torch.manual_seed(0)
    model = tiny_llama(50, seed=2)
    ids = torch.randint(3, 50, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    return model, batch


def test_sft_weights_give_the_hand_computed_weighted_sum_and_the_default_is_the_mean():
    model, batch = _sft_case()
    default, metrics = sft.SFT()(model, dict(batch), None)
    assert "unweighted_loss" not in metrics
    logits = model(input_ids=batch["input_ids"]).logits.float()
    by_hand = {}
    for b in range(2):
        for s in range(1, 7):
            if batch["labels"][b, s] != -100:
                by_hand[(b, s)] = F.cross_entropy(logits[b, s - 1], batch["labels"][b, s]).item()
    assert default.item() == pytest.approx(sum(by_hand.values()) / len(by_hand), rel=1e-5)
    weights = torch.zeros(2, 7)
    weights[0, 4], weights[0, 6], weights[1, 5], weights[1, 0] = 2.0, 0.5, 1.0, 9.0  # [1, 0]: unlabelled, ignored
    loss, metrics = sft.SFT()(model, {**batch, TOKEN_WEIGHTS: weights}, None)
    assert loss.item() == pytest.approx(2.0 * by_hand[(0, 4)] + 0.5 * by_hand[(0, 6)] + by_hand[(1, 5)], rel=1e-5)
    assert metrics["unweighted_loss"].item() == pytest.approx(default.item(), rel=1e-6)
    # a callable of the trained-token mask; 1 / count reproduces the default mean
    mean_again, _ = sft.SFT()(model, {**batch, TOKEN_WEIGHTS: lambda m: m.float() / m[:, 1:].sum()}, None)
    assert mean_again.item() == pytest.approx(default.item(), rel=1e-6)
    with pytest.raises(RunFailed, match=r"expected \(2, 7\)"):
        sft.SFT()(model, {**batch, TOKEN_WEIGHTS: torch.ones(2, 6)}, None)


def test_decoupled_settings_are_checked():
    grpo_params = REGISTRY.parse("objective", {"name": "grpo", "decoupled_alpha": 0.001}, "objective").params
    assert grpo.decoupled_weighting(grpo_params).alpha == 0.001
    assert grpo.decoupled_weighting(REGISTRY.parse("objective", {"name": "grpo"}, "objective").params) is None
    with pytest.raises(ConfigError, match="loss_type: 'bnpo' does not apply"):
        REGISTRY.parse("objective", {"name": "grpo", "decoupled_alpha": 0.001, "loss_type": "bnpo"}, "objective")
    with pytest.raises(ConfigError, match="decoupled_response: only applies"):
        REGISTRY.parse("objective", {"name": "grpo", "decoupled_response": "token"}, "objective")
