"""torchdistill's intermediate losses in ``objective: distill`` (recipe kd_torchdistill) and SALT's pieces (recipe
salt): the distillation weight on the timeline and the SLM's hard-but-learnable band.

Each loss is checked against values written out by hand from torchdistill's definitions (``losses/mid_level.py``);
the hint regressor is checked to train with the student and to stay out of the exported model."""

from __future__ import annotations

import math
import re
import types

import numpy as np
import pytest
import torch
import transformers

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.objectives.feature_losses import attention_transfer_loss, hint_loss, pkt_loss
from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError
from effitrain.timeline import parse_timeline

VOCAB = 48


def llama(hidden: int, layers: int, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def batch(rows: int = 3, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def distill(student, teacher_dir, **params):
    load_builtin_blocks()
    block = REGISTRY.parse("objective", {"name": "distill", "teacher": str(teacher_dir), **params})
    return block.build(model=student, device="cpu", bf16_supported=False, tokenizer=None)


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
    """A teacher twice as wide and one layer deeper than the students below (hidden 64 vs 32)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    llama(64, 3, seed=7).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------- the formulas
def test_hint_loss_is_the_squared_error_summed_over_units_and_averaged_over_positions():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 6.0]]])
    # position 0: (1-0)^2 + 0 = 1; position 1: 0 + (4-6)^2 = 4
    assert hint_loss(student, teacher, torch.tensor([[True, True]])).item() == 2.5
    assert hint_loss(student, teacher, torch.tensor([[True, False]])).item() == 1.0
    # normalize: divided by the teacher's mean squared norm, (0 + 4 + 9 + 36) / 2 = 24.5
    assert hint_loss(student, teacher, torch.tensor([[True, True]]), normalize=True).item() == \
        pytest.approx(2.5 / 24.5, rel=1e-6)
    # torchdistill's MSELoss(reduction='sum') divided by the number of positions
    assert hint_loss(student, teacher, torch.ones(1, 2, dtype=torch.bool)) == \
        torch.nn.MSELoss(reduction="sum")(student, teacher) / 2


def test_attention_transfer_matches_torchdistills_code_and_paper_modes_by_hand():
    student = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])  # mean squares per position: 1, 9
    teacher = torch.tensor([[[2.0, 2.0], [2.0, 2.0], ]])  # 4, 4
    a_s = [1 / math.sqrt(82), 9 / math.sqrt(82)]
    a_t = [1 / math.sqrt(2), 1 / math.sqrt(2)]
    diff = [a_s[0] - a_t[0], a_s[1] - a_t[1]]
    code = (diff[0] ** 2 + diff[1] ** 2) / 2  # (a_s - a_t).pow(2).mean()
    paper = math.sqrt(diff[0] ** 2 + diff[1] ** 2) / 1  # ||a_s - a_t|| summed over the batch / batch size
    assert attention_transfer_loss(student, teacher, "code").item() == pytest.approx(code, rel=1e-6)
    assert attention_transfer_loss(student, teacher, "paper").item() == pytest.approx(paper, rel=1e-6)
    # widths may differ: the map averages over the hidden units
    wide = torch.tensor([[[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]]])
    assert attention_transfer_loss(student, wide, "code").item() == pytest.approx(code, rel=1e-6)


def test_pkt_is_the_kl_of_cosine_similarity_distributions_written_out_by_loops():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    eps = 1e-7

    def distribution(x):
        unit = [[v / (math.sqrt(sum(w * w for w in row)) + eps) for v in row] for row in x.tolist()]
        sim = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
        return [[s / sum(row) for s in row] for row in sim]

    p_s, p_t = distribution(student), distribution(teacher)
    expected = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
                   for i in range(3) for j in range(3)) / 9
    assert pkt_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01  # different geometries: not a comparison of zeros
    assert pkt_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------- the objective
def test_the_hint_regressor_trains_with_the_student_and_the_total_adds_each_weighted_term(wide_teacher):
    student, b = llama(32, 2, seed=0).train(), batch()
    objective = distill(student, wide_teacher, alpha=0.5, temperature=2.0,
                        hint={"student_layer": 1, "teacher_layer": 2, "weight": 0.5},
                        attention={"pairs": [[1, 1], [2, 3]], "weight": 2.0},
                        pkt={"student_layer": 2, "teacher_layer": 3, "weight": 3.0})
    regressor = student.training_only["hint_regressor"]
    assert objective.regressor is regressor and tuple(regressor.weight.shape) == (64, 32)
    assert any(p is regressor.weight for p in student.parameters())  # the optimizer built next will see it

    loss, m = objective(student, b, None)
    expected = 0.5 * m["soft_loss"] + 0.5 * m["hard_loss"] + 0.5 * m["hint_loss"] + 2.0 * m["at_loss"] + \
        3.0 * m["pkt_loss"]
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    assert min(m["hint_loss"], m["at_loss"], m["pkt_loss"]) > 0

    # the hint term by hand: the regressor on the student's layer 1, against the teacher's layer 2
    with torch.no_grad():
        s = student(**b, output_hidden_states=True).hidden_states[1][:, :-1]
        t = objective.teacher(input_ids=b["input_ids"], output_hidden_states=True).hidden_states[2][:, :-1]
        by_hand = (regressor(s) - t).pow(2).sum(-1).mean()
    assert m["hint_loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)

    loss.backward()
    assert regressor.weight.grad is not None and regressor.weight.grad.abs().sum() > 0
    before = regressor.weight.detach().clone()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert not torch.equal(before, regressor.weight)


def test_the_regressor_is_dropped_at_export_and_from_a_checkpoints_state(wide_teacher, tmp_path):
    from effitrain.models.training_only import strip_state
    from effitrain.peft.adapters import export_final_model

    student = llama(32, 2, seed=0)
    distill(student, wide_teacher, hint={"student_layer": 2, "teacher_layer": 3})
    state = student.state_dict()
    assert {k for k in state if k.startswith("training_only.")} == \
        {"training_only.hint_regressor.weight", "training_only.hint_regressor.bias"}
    export_final_model(student, None, tmp_path / "final")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert set(loaded.state_dict()) == set(strip_state(state))  # nothing missing, nothing extra
    assert hasattr(student, "training_only")  # the live model keeps its regressor (a mid-run export)


def test_equal_widths_need_no_regressor(tmp_path):
    student = llama(32, 2, seed=0)
    llama(32, 3, seed=5).save_pretrained(tmp_path / "same_width")
    objective = distill(student, tmp_path / "same_width", hint={"student_layer": 2, "teacher_layer": 3})
    assert objective.regressor is None and not hasattr(student, "training_only")


def test_a_layer_the_model_does_not_have_is_refused_naming_the_key(wide_teacher):
    with pytest.raises(ConfigError, match=re.escape("objective.hint: teacher layer 4 does not exist; the teacher "
                                                    "has 3 decoder layers")):
        distill(llama(32, 2, seed=0), wide_teacher, hint={"student_layer": 1, "teacher_layer": 4})
    with pytest.raises(ConfigError, match=re.escape("objective.attention.pairs[0]: [2] is not [student_layer, "
                                                    "teacher_layer]")):
        distill(llama(32, 2, seed=0), wide_teacher, attention={"pairs": [[2]]})
    with pytest.raises(ConfigError, match=re.escape("objective.pkt.teacher_layr: unknown key")):
        distill(llama(32, 2, seed=0), wide_teacher, pkt={"student_layer": 1, "teacher_layr": 1})


def test_a_student_layer_past_the_models_depth_is_refused_at_validation_before_any_stage_trains():
    with pytest.raises(ConfigError, match=re.escape("stages.student: incompatible configuration "
                                                    "[distill_student_layers_exist]: objective.attention.pairs[1]: "
                                                    "student layer 5 does not exist; model.num_layers=4")):
        validate(compose_config(["+recipe=kd_torchdistill", "stages.1.objective.attention.pairs=[[2,3],[5,6]]"]).cfg)


# ------------------------------------------------------------------------------------------- SALT
def salt_timeline(max_steps: int = 100):
    raw = {"distill_weight": {"unit": "step", "interpolate": "linear",
                              "points": [{"at": 0, "value": 0.5}, {"at": 40, "value": 0.0}]}}
    return parse_timeline(raw).resolve(max_steps=max_steps, tokens_per_step=64)


def test_the_distillation_weight_decays_linearly_to_zero_and_stays_there():
    timeline = salt_timeline()
    values = [timeline.value("distill_weight", s) for s in (0, 10, 20, 39, 40, 99)]
    assert values == pytest.approx([0.5, 0.375, 0.25, 0.5 * 1 / 40, 0.0, 0.0], abs=1e-15)
    assert values[-2:] == [0.0, 0.0]  # exactly zero: the objective then skips the teacher


def test_distill_follows_the_timeline_and_skips_the_teacher_once_the_weight_is_zero(tmp_path):
    student, b = llama(32, 2, seed=0), batch()
    llama(32, 2, seed=3).save_pretrained(tmp_path / "slm")
    objective = distill(student, tmp_path / "slm", alpha=0.9, temperature=1.0)
    calls = []
    objective.teacher.register_forward_hook(lambda *a: calls.append(1))
    state = types.SimpleNamespace(timeline=salt_timeline(), step=20)
    loss, m = objective(student, b, state)
    assert m["distill_weight"].item() == 0.25 and len(calls) == 1  # the timeline, not alpha = 0.9
    assert torch.allclose(loss, 0.25 * m["soft_loss"] + 0.75 * m["hard_loss"], atol=1e-6)
    state.step = 40
    loss, m = objective(student, b, state)
    assert len(calls) == 1  # no teacher pass after the KD phase
    assert torch.equal(loss, student(**b).loss) and m["soft_loss"].item() == 0.0


def test_the_distillation_weight_needs_the_distill_objective_and_a_value_in_0_1():
    weight = "+timeline={distill_weight: {unit: step, points: [{at: 0, value: 0.5}]}}"
    with pytest.raises(ConfigError, match=re.escape("timeline.distill_weight: read only by objective=distill, but "
                                                    "objective=causal_lm")):
        validate(compose_config([weight]).cfg)
    with pytest.raises(ConfigError, match=re.escape("timeline.distill_weight.points[0].value: a distillation weight "
                                                    "is in [0, 1]")):
        parse_timeline({"distill_weight": {"unit": "step", "points": [{"at": 0, "value": 1.5}]}})


class _FixedLogits(torch.nn.Module):
    """A 'reference model' whose next-token logits at position t are row t of a table, whatever the input."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return types.SimpleNamespace(logits=self.table[: input_ids.shape[1]].unsqueeze(0).expand(
            input_ids.shape[0], -1, -1))


def test_salt_scores_an_example_by_the_median_loss_of_its_tokens_in_the_slms_top_k():
    """SALT's Eq. 10: only tokens whose true token is among the SLM's top-k count (learnable), and the score is the
    median of their losses. Five positions over a vocabulary of 6; with k = 2 the true tokens at positions 1, 2 and 4
    are in the top 2, position 3's is ranked 6th (not learnable); the mean loss counts it, the score does not."""
    from effitrain.selection.refmodel import learnable_token_medians

    table = torch.tensor([[4.0, 3, 2, 1, 0, -1],    # predicts token 1 at t=1: rank 2
                          [0.0, 5, 1, 0, 0, 0],     # predicts token 1 at t=2: rank 1
                          [3.0, 2, 1, 0, -1, -9],   # predicts token 5 at t=3: rank 6 (not in the top 2)
                          [1.0, 1, 4, 0, 0, 0],     # predicts token 0 at t=4: rank 2 (tied with 1)
                          [0.0, 0, 0, 0, 0, 0]])
    ids = torch.tensor([[2, 1, 1, 5, 0]])
    encode = lambda texts: (ids.expand(len(texts), -1), torch.ones(len(texts), 5, dtype=torch.long))
    losses = torch.nn.functional.cross_entropy(table[:4], ids[0, 1:], reduction="none")
    score = learnable_token_medians(_FixedLogits(table), encode, ["x"], "cpu", top_k=2)
    assert score == pytest.approx([float(torch.tensor([losses[0], losses[1], losses[3]]).median())])
    assert losses[2] > 5 and losses.mean() > 2 * score[0]   # the unlearnable token's loss is left out
    # nothing learnable (k = 1 and every true token off the top): NaN, which the top-k selector ranks last
    unlearnable = torch.tensor([[2, 5, 5, 5, 5]])
    encode_un = lambda texts: (unlearnable, torch.ones(1, 5, dtype=torch.long))
    assert math.isnan(learnable_token_medians(_FixedLogits(table), encode_un, ["x"], "cpu", top_k=1)[0])


def test_salt_ds_takes_the_highest_eq10_scores_where_the_mean_loss_band_takes_others():
    """The recipe's selection (topk on the Eq. 10 score) against the earlier band of mean losses: an example that
    is hard only through tokens the SLM cannot rank (a high mean, a low Eq. 10 score) is kept by the band, not by
    SALT_DS; examples without a learnable token (NaN) come last."""
    from effitrain.selection.selectors import BandSelector, TopKSelector

    load_builtin_blocks()
    salt = compose_config(["+recipe=salt"]).cfg["stages"][1]["selection"]
    assert salt["scorer"]["statistic"] == "topk_median" and salt["scorer"]["top_k"] == 10
    assert salt["selector"] == {"name": "topk"}
    eq10 = np.array([1.0, 2.0, 5.0, 4.0, float("nan"), 3.0, 0.5, 6.0, 2.5, 1.5])
    mean = np.array([1.0, 2.0, 2.1, 4.0, 9.0, 3.0, 8.0, 2.2, 2.5, 1.5])   # example 6: hard where it is unlearnable
    topk = TopKSelector(REGISTRY.parse("selector", {"name": "topk"}).params)
    kept = topk.select(eq10, None, np.ones(10), budget=4, rng=np.random.default_rng(0))
    assert sorted(kept.tolist()) == [2, 3, 5, 7]
    band = BandSelector(REGISTRY.parse("selector", {"name": "band", "low": 0.5, "high": 0.9}).params)
    assert 6 in band.select(mean, None, np.ones(10), budget=4, rng=np.random.default_rng(0)).tolist()
    assert topk.select(eq10, None, np.ones(10), budget=10, rng=np.random.default_rng(0)).tolist()[-1] == 4


def test_salt_ds_keeps_the_band_of_slm_losses_above_the_median_and_below_the_noisiest_tenth():
    """The earlier SALT_DS reading, still an option (scorer.statistic=mean, selector band [0.5, 0.9], budget the
    band's share): on 20 crafted losses 0..19 the quantiles are 9.5 and 17.1, so exactly the losses 10..17 are
    kept: harder than half the pool, but not the hardest tenth."""
    from effitrain.selection.selectors import BandSelector

    load_builtin_blocks()
    params = REGISTRY.parse("selector", {"name": "band", "low": 0.5, "high": 0.9}).params
    losses = np.array([3, 17, 0, 12, 19, 5, 8, 11, 14, 1, 18, 2, 9, 16, 4, 13, 6, 10, 15, 7], dtype=float)
    kept = BandSelector(params).select(losses, None, np.ones(20), budget=0.4 * 20, rng=np.random.default_rng(0))
    assert sorted(losses[kept].tolist()) == [10, 11, 12, 13, 14, 15, 16, 17]


def test_plan_prints_salts_distillation_weight_per_stage():
    from effitrain.plan import format_section, plan_sections

    composed = compose_config(["+recipe=salt"])
    slm, kd, llm = plan_sections(composed.cfg, composed.recipes)
    assert {r["step"]: r["distill_weight"] for r in kd.rows} == pytest.approx({0: 0.5, 20: 0.4, 99: 0.005})
    assert "distill_weight" in format_section(kd).splitlines()[1]
    assert all(r["distill_weight"] is None for r in slm.rows + llm.rows)
    assert "distill_weight" not in format_section(llm)
