"""Logit-swap self-distillation (objective: lssd, Mix-CPT): the swapped target hand-computed on a 4-token vocabulary,
no loss and no gradient where the gold token is already the top one, a gradient that moves only the gold and the
old top logit (gold up), the objective on chat rows equal to the per-token formula over the assistant tokens, the
recipe's checks, and a SIGKILL mid-stage whose resume repeats the losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.objectives.lssd import LSSD, lssd_token_losses, swapped_logits
from effitrain.registry import ConfigError


def test_the_swapped_target_on_a_4_token_vocabulary_hand_computed():
    z = torch.tensor([1.0, 3.0, 0.5, 2.0])  # top: token 1; gold: token 3
    assert swapped_logits(z, torch.tensor(3)).tolist() == [1.0, 2.0, 0.5, 3.0]
    target = [math.exp(v) for v in (1.0, 2.0, 0.5, 3.0)]
    target = [t / sum(target) for t in target]
    p = [math.exp(v) for v in (1.0, 3.0, 0.5, 2.0)]
    p = [x / sum(p) for x in p]
    kl = sum(t * (math.log(t) - math.log(q)) for t, q in zip(target, p))
    assert lssd_token_losses(z, torch.tensor(3)).item() == pytest.approx(kl, abs=1e-6)
    # the tokens outside the swap keep their probabilities: the normaliser is the same
    assert target[0] == pytest.approx(p[0]) and target[2] == pytest.approx(p[2])


def test_gold_already_top_the_target_is_the_models_distribution():
    z = torch.tensor([[0.2, -1.0, 2.5, 0.0]], requires_grad=True)
    assert torch.equal(swapped_logits(z.detach(), torch.tensor([2])), z.detach())
    loss = lssd_token_losses(z, torch.tensor([2])).sum()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.allclose(z.grad, torch.zeros_like(z), atol=1e-7)


def test_the_gradient_raises_the_gold_logit_lowers_the_old_top_and_leaves_the_rest():
    z = torch.tensor([1.0, 3.0, 0.5, 2.0], requires_grad=True)
    lssd_token_losses(z, torch.tensor(3)).backward()
    p = torch.softmax(z.detach(), -1)
    # d KL(target || softmax z) / dz = p - target: nonzero only at gold (p_g - p_top) and at the old top
    assert z.grad[3].item() == pytest.approx((p[3] - p[1]).item(), abs=1e-6) and z.grad[3] < 0
    assert z.grad[1].item() == pytest.approx((p[1] - p[3]).item(), abs=1e-6) and z.grad[1] > 0
    assert z.grad[0].item() == pytest.approx(0.0, abs=1e-7) and z.grad[2].item() == pytest.approx(0.0, abs=1e-7)
    # one gradient step makes the gold token the top one; cross-entropy's step would lower every other logit
    stepped = z.detach() - 2.0 * z.grad
    assert stepped.argmax().item() == 3


def test_the_objective_averages_the_token_kl_over_the_assistant_tokens_only():
    class Logits(torch.nn.Module):
        """A 'model' whose logits are a fixed table per position (what the objective reads)."""

        def __init__(self, table):
            super().__init__()
            self.table = torch.nn.Parameter(table)

        def forward(self, input_ids, **kwargs):
            return type("Out", (), {"logits": self.table.unsqueeze(0)})()

    torch.manual_seed(0)
    table = torch.randn(5, 4)
    ids = torch.tensor([[0, 1, 2, 3, 0]])
    labels = torch.tensor([[-100, -100, 2, 3, -100]])  # positions 1 and 2 predict assistant tokens 2 and 3
    loss, metrics = LSSD()(Logits(table), {"input_ids": ids, "labels": labels}, None)
    expected = (lssd_token_losses(table[1], torch.tensor(2)) + lssd_token_losses(table[2], torch.tensor(3))) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["assistant_tokens"].item() == 2


def test_the_recipe_and_its_sft_baseline_pass_check_and_lssd_refuses_pairs_and_prompts():
    validate(compose_config(["+recipe=mix_cpt"]).cfg)
    validate(compose_config(["+recipe=mix_cpt", "stages.1.objective={name:sft}"]).cfg)
    for fmt in ("preference", "prompts"):
        with pytest.raises(ConfigError, match=f"dataset.format={fmt} .*objective=lssd"):
            validate(compose_config(["+recipe=mix_cpt", f"+stages.1.dataset.format={fmt}"]).cfg)


@pytest.mark.slow
def test_sigkill_in_the_lssd_stage_then_resume_repeats_the_losses(tmp_path):
    """The recipe's format-alignment stage, tiny, killed right after its step-3 checkpoint and resumed: steps 4-6
    log the same losses as the uninterrupted run."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=mix_cpt", "dataset.max_docs_per_domain=120", "stages.0.train.max_steps=6",
                "stages.1.dataset.max_docs_per_domain=60", "stages.1.train.max_steps=6",
                "+stages.1.train.save_every=3", "methods.answer_accuracy.examples=4", "train.keep_checkpoints=3"]

    def metrics(run_dir):
        lines = (run_dir / "stages" / "02-format_alignment" / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    assert len({round(m["loss"], 6) for m in expected}) > 1

    sigkill_at([*run_args, f"run_dir={killed}"],
               killed / "stages" / "02-format_alignment" / "checkpoints" / "step_00000003" / "COMPLETE")
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == [m["step"] for m in expected] == list(range(1, 7))
    for m in expected[3:]:
        for key in ("loss", "lssd_gold_top", "token_ce"):
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)
