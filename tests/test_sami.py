"""SAMI (objective: sami): the loss on a hand-computed 2 x 2 matrix, its minimum where the diagonal dominates, the
gradient of the loss towards the diagonal, responses that are constants (gradient only through the
log-probabilities), the matrix's layout against one sequence scored by hand, the built-in constitutions' checks,
check-time refusals, and a SIGKILL mid-stage whose resume repeats the losses."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.objectives.sami import BUILTIN_CHECKS, FULL_SENTENCE, NUMBER_ONLY, sami_loss
from effitrain.registry import ConfigError
from test_grpo import tiny_llama, tokenizer  # noqa: F401 (a fixture: a BPE trained on the arithmetic)


def _lse(*xs: float) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def test_the_loss_of_a_2x2_matrix_equals_the_hand_computed_value():
    a, b, c, d = -1.0, -2.0, -3.0, -0.5  # L[i, j]: response j under constitution i
    rows = (-(a - _lse(a, b)) - (d - _lse(c, d))) / 2       # which response was written under constitution i
    columns = (-(a - _lse(a, c)) - (d - _lse(b, d))) / 2    # which constitution wrote response j
    loss, row_loss, column_loss = sami_loss(torch.tensor([[a, b], [c, d]]))
    assert row_loss.item() == pytest.approx(rows, abs=1e-6)
    assert column_loss.item() == pytest.approx(columns, abs=1e-6)
    assert loss.item() == pytest.approx((rows + columns) / 2, abs=1e-6)
    assert rows != pytest.approx(columns)  # the two directions differ: a transposed matrix would be caught


def test_a_batch_of_prompts_averages_their_losses():
    one, two = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]]), torch.tensor([[-0.2, -4.0], [-1.0, -1.5]])
    batched = sami_loss(torch.stack([one, two]))[0]
    assert batched.item() == pytest.approx((sami_loss(one)[0].item() + sami_loss(two)[0].item()) / 2, abs=1e-6)


def test_the_loss_is_smallest_when_the_diagonal_dominates():
    uniform = sami_loss(torch.zeros(3, 3))[0].item()
    assert uniform == pytest.approx(math.log(3), abs=1e-6)  # nothing tells the constitutions apart: log C
    diagonal = sami_loss(torch.full((3, 3), -5.0).fill_diagonal_(-0.1))[0].item()
    off_diagonal = sami_loss(torch.full((3, 3), -0.1).fill_diagonal_(-5.0))[0].item()
    assert diagonal < 0.05 < uniform < off_diagonal
    # a random matrix never beats the same entries with its largest ones moved onto the diagonal
    torch.manual_seed(0)
    m = torch.randn(4, 4)
    sorted_diag = m.clone()
    values = m.flatten().sort(descending=True).values
    sorted_diag.fill_(values[-1])
    sorted_diag.diagonal().copy_(values[:4])
    assert sami_loss(sorted_diag)[0] < sami_loss(m)[0]


def test_the_gradient_raises_the_diagonal_and_lowers_the_rest_hand_computed():
    m = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]], requires_grad=True)
    sami_loss(m)[0].backward()
    p_row, p_col = torch.softmax(m.detach(), dim=1), torch.softmax(m.detach(), dim=0)
    eye = torch.eye(2)
    # d loss / d L[i, j] = ((softmax_row - I) + (softmax_col - I)) / (2 C)
    assert torch.allclose(m.grad, ((p_row - eye) + (p_col - eye)) / 4, atol=1e-6)
    assert (m.grad.diagonal() < 0).all() and (m.grad - torch.diag(m.grad.diagonal()) >= 0).all()


def test_the_built_in_constitutions_checks():
    number, sentence = BUILTIN_CHECKS[NUMBER_ONLY], BUILTIN_CHECKS[FULL_SENTENCE]
    assert number("82") and number(" -7 ") and not number("The answer is 82.") and not number("82 apples")
    assert sentence("The answer is 82.") and not sentence("82") and not sentence("the answer is 82")


def test_plain_or_sentence_answers_in_both_styles_at_random():
    from effitrain.data.arithmetic_chat import splits

    train, _ = splits(200, 8, style="plain_or_sentence")
    answers = [e["messages"][1]["content"] for e in train]
    plain = sum(BUILTIN_CHECKS[NUMBER_ONLY](a) for a in answers)
    sentences = sum(BUILTIN_CHECKS[FULL_SENTENCE](a) for a in answers)
    assert plain + sentences == 200 and 60 < plain < 140


# ------------------------------------------------------------------------------ the objective on a tiny model
@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(len(tokenizer), seed=0), tokenizer


def _objective(tokenizer, **kwargs):
    from effitrain.objectives.sami import SAMI

    return SAMI(tokenizer, [NUMBER_ONLY, FULL_SENTENCE], max_new_tokens=5, temperature=1.0, seed=3, **kwargs)


def _prompts(tokenizer):
    from effitrain.data.chat import prompt_ids

    return [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 3+4?", "What is 12*3?")]


def test_each_entry_scores_response_j_after_constitution_i_and_the_prompt(tiny):
    from effitrain.data.chat import prompt_ids

    model, tokenizer = tiny
    objective = _objective(tokenizer)
    prompts = _prompts(tokenizer)
    s = objective.sample(model, prompts, SimpleNamespace(micro_step=0, rank=0), "cpu")
    with torch.no_grad():
        matrix = objective.logprob_matrix(model, s, len(prompts))
    b, i, j = 1, 0, 1
    # by hand: the conversation [system: constitution i, user: question b] as the chat rows tokenize it, then the
    # response prompt b got under constitution j, unpadded, scored from position 0
    prompt = prompt_ids(tokenizer, [{"role": "system", "content": NUMBER_ONLY},
                                    {"role": "user", "content": "What is 12*3?"}])
    n = int(s["mask"][b * 2 + j].sum())
    response = s["responses"][b * 2 + j, :n].tolist()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
    expected = logp.gather(-1, torch.tensor(response).unsqueeze(-1)).mean().item()
    assert matrix[b, i, j].item() == pytest.approx(expected, abs=1e-4)
    assert matrix[b, i, j].item() != pytest.approx(matrix[b, j, i].item(), abs=1e-4)


def test_responses_are_constants_the_gradient_flows_through_the_log_probabilities_only(tiny):
    model, tokenizer = tiny
    objective = _objective(tokenizer)
    prompts = _prompts(tokenizer)
    s = objective.sample(model, prompts, SimpleNamespace(micro_step=0, rank=0), "cpu")
    assert not s["responses"].requires_grad and s["responses"].grad_fn is None
    model.zero_grad()
    matrix = objective.logprob_matrix(model, s, len(prompts))
    loss = sami_loss(matrix)[0]
    loss.backward()
    through_params = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the same gradient by the chain rule through the matrix alone: d loss/d L, then L's own backward
    model.zero_grad()
    again = objective.logprob_matrix(model, s, len(prompts))
    leaf = again.detach().requires_grad_()
    dloss = torch.autograd.grad(sami_loss(leaf)[0], leaf)[0]
    again.backward(dloss)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, through_params[name], atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in through_params.values())


def test_stage_start_samples_from_a_frozen_copy_so_training_does_not_change_the_draws(tiny):
    import copy

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    frozen = copy.deepcopy(model).eval()
    objective = _objective(tokenizer, sampler_model=frozen)
    prompts = _prompts(tokenizer)
    state = SimpleNamespace(micro_step=7, rank=0)
    before = objective.sample(policy, prompts, state, "cpu")["responses"]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(objective.sample(policy, prompts, state, "cpu")["responses"], before)
    on_policy = _objective(tokenizer)
    assert not torch.equal(on_policy.sample(policy, prompts, state, "cpu")["responses"], before)


# ----------------------------------------------------------------------------------------------- check time
def test_the_recipe_passes_check():
    validate(compose_config(["+recipe=sami"]).cfg)


@pytest.mark.parametrize("override, words", [
    ("+stages.1.objective.constitutions=['Be brief.']", "at least two"),
    ("+stages.1.objective.constitutions=['Be brief.','Be brief.']", "twice"),
    ("stages.1.dataset.format=chat", "dataset.format=prompts"),
    ("parallelism=zero3", "zero2"),
])
def test_bad_settings_are_refused_at_check(override, words):
    with pytest.raises(ConfigError, match=words):
        validate(compose_config(["+recipe=sami", override]).cfg)


@pytest.mark.slow
def test_sigkill_in_the_sami_stage_then_resume_repeats_the_losses(tmp_path):
    """The recipe's SAMI stage, tiny, killed right after its step-3 checkpoint and resumed: steps 4-6 log the same
    losses and follow shares as the uninterrupted run (the responses are drawn again from the restored policy with
    the same seeds)."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=sami", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=10",
                "stages.1.train.max_steps=6", "+stages.1.train.save_every=3", "stages.1.objective.max_new_tokens=4",
                "stages.1.train.micro_batch_size=2", "methods.answer_accuracy.examples=4", "train.keep_checkpoints=3"]

    def metrics(run_dir):
        lines = (run_dir / "stages" / "02-sami" / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    assert len({round(m["loss"], 6) for m in expected}) > 1  # the steps differ: a repeated constant would pass

    sigkill_at([*run_args, f"run_dir={killed}"],
               killed / "stages" / "02-sami" / "checkpoints" / "step_00000003" / "COMPLETE")
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == [m["step"] for m in expected] == list(range(1, 7))
    for m in expected[3:]:
        for key in ("loss", "sami_follow", "sami_row_loss", "response_tokens"):
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)
