"""DUMP (curriculum: dump): the UCB score and softmax on hand-computed values, draws that follow the distributions
whose completions have the larger |advantage|, an unvisited distribution tried first, a state round trip that
continues with the same batches, check-time refusals, and a SIGKILL mid-stage whose resume repeats the losses."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.curriculum.dump import COMPLETION_ADVANTAGES, DumpSampler, softmax, ucb_scores
from effitrain.data.arithmetic_chat import domain_of
from effitrain.registry import ConfigError

NAMES = ["add_1d", "mul_1d", "sub_2d"]  # sorted, as the sampler orders them


def _sampler(names=NAMES, *, window=300, exploration=1.0, temperature=0.1, micro=8, accum=1, seed=5) -> DumpSampler:
    labels = np.repeat(np.array(names), 200)
    return DumpSampler(labels, window=window, exploration=exploration, temperature=temperature, seed=seed,
                       micro_batch_size=micro, grad_accum=accum, world_size=1, rank=0)


def _state(advantages=None) -> SimpleNamespace:
    """The part of the engine's State the hook reads."""
    batch = {} if advantages is None else {COMPLETION_ADVANTAGES: torch.as_tensor(advantages, dtype=torch.float32)}
    spec = SimpleNamespace(block=lambda group: SimpleNamespace(name="grpo"))
    return SimpleNamespace(batch=batch, spec=spec, world_size=1, metrics={})


def _train(sampler: DumpSampler, steps: int, abs_advantage: dict[str, float], group: int = 4,
           batches=None) -> list[list[int]]:
    """``steps`` optimizer steps of the loop's calls: draw each micro-batch, give every completion of a row from
    distribution d the advantage +-abs_advantage[d] (a group's signs alternate, as centred advantages do), end the
    step.  Returns the micro-batches drawn."""
    it = iter(sampler) if batches is None else batches
    drawn = []
    for _ in range(steps):
        for _ in range(sampler.grad_accum):
            rows = next(it)
            drawn.append(rows)
            values = [abs_advantage[sampler.names[sampler.hook.row_domains[r]]] * (-1) ** i
                      for r in rows for i in range(group)]
            sampler.hook.on_after_forward(_state(values))
        sampler.hook.on_step_end(_state())
    return drawn


def _domains(sampler: DumpSampler, rows: list[list[int]]) -> list[str]:
    return [sampler.names[sampler.hook.row_domains[r]] for batch in rows for r in batch]


# ---------------------------------------------------------------------------------------------- the score
def test_ucb_is_the_windows_mean_abs_advantage_plus_the_exploration_bonus_hand_computed():
    sampler = _sampler(["a", "b"], window=3)
    hook = sampler.hook
    assert hook.weights().tolist() == [0.5, 0.5]  # before the first update: uniform, as the authors start
    hook.observe([(0, 0.5), (0, 1.0), (1, 0.2), (0, 2.0), (0, 0.3), (1, 0.4)])
    # a's window of 3 keeps its last three (1.0, 2.0, 0.3): mean 1.1, count 4; b: (0.2, 0.4), mean 0.3, count 2
    assert hook.mean_abs_advantage().tolist() == pytest.approx([1.1, 0.3])
    assert hook.counts.tolist() == [4, 2]
    ucb_a = 1.1 + math.sqrt(2 * math.log(7) / 5)  # N = 6 completions: ln(N + 1); n_a + 1 = 5
    ucb_b = 0.3 + math.sqrt(2 * math.log(7) / 3)
    assert ucb_scores(hook.mean_abs_advantage(), hook.counts, 1.0).tolist() == pytest.approx([ucb_a, ucb_b])
    z = math.exp(ucb_a / 0.1) + math.exp(ucb_b / 0.1)
    assert hook.weights().tolist() == pytest.approx([math.exp(ucb_a / 0.1) / z, math.exp(ucb_b / 0.1) / z])
    assert sampler.weights(0).tolist() == pytest.approx(hook.weights().tolist())  # what the draws use


def test_softmax_of_large_scores_does_not_overflow():
    assert softmax(np.array([1e4, 1e4 - 0.1]), 0.1).tolist() == pytest.approx([1 / (1 + math.exp(-1)),
                                                                                 math.exp(-1) / (1 + math.exp(-1))])


# ---------------------------------------------------------------------------------------------- the behaviour
def test_the_distribution_with_the_larger_abs_advantage_is_drawn_more():
    sampler = _sampler()
    drawn = _train(sampler, 30, {"add_1d": 0.1, "mul_1d": 0.1, "sub_2d": 1.0})
    later = _domains(sampler, drawn[10:])
    share = later.count("sub_2d") / len(later)
    assert share > 0.8, share                                    # uniform would be 1/3
    assert sampler.hook.weights()[2] > 0.9 and sampler.hook.updates == 30
    # and the other way round: the same run with the |advantages| swapped favours add_1d
    swapped = _sampler()
    later = _domains(swapped, _train(swapped, 30, {"add_1d": 1.0, "mul_1d": 0.1, "sub_2d": 0.1})[10:])
    assert later.count("add_1d") / len(later) > 0.8


def test_an_unvisited_distribution_is_tried_first():
    sampler = _sampler()
    hook = sampler.hook
    # many completions of add_1d and mul_1d with large |A|; none of sub_2d yet
    hook.observe([(0, 2.0)] * 40 + [(1, 2.0)] * 40)
    seen = 2.0 + math.sqrt(2 * math.log(81) / 41)   # mean |A| + bonus of a visited distribution
    unseen = 0.0 + math.sqrt(2 * math.log(81) / 1)   # no window, n = 0: the largest bonus
    assert unseen > seen
    p_unseen = 1 / (1 + 2 * math.exp((seen - unseen) / 0.1))
    assert hook.weights()[2] == pytest.approx(p_unseen) and p_unseen > 0.98
    drawn = np.concatenate([sampler.slot_domains(step) for step in range(20)])
    assert np.mean(drawn == 2) > 0.95


def test_metrics_name_each_distributions_weight_and_mean_abs_advantage():
    sampler = _sampler(micro=2)
    rows = next(iter(sampler))
    sampler.hook.on_after_forward(_state([0.5, -0.5] * 2 * len(rows)))  # groups of 4 completions
    end = _state()
    sampler.hook.on_step_end(end)
    assert sorted(end.metrics) == sorted([f"dump/p/{d}" for d in NAMES] + [f"dump/adv/{d}" for d in NAMES])
    assert sum(v for k, v in end.metrics.items() if k.startswith("dump/p/")) == pytest.approx(1.0)
    seen = set(_domains(sampler, [rows]))
    assert all(end.metrics[f"dump/adv/{d}"] == pytest.approx(0.5 if d in seen else 0.0) for d in NAMES)


def test_a_step_with_no_new_samples_leaves_the_weights():
    """grpo with iterations > 1 reuses its samples: those steps publish no advantages and change nothing."""
    sampler = _sampler()
    batches = iter(sampler)
    _train(sampler, 3, {"add_1d": 0.1, "mul_1d": 1.0, "sub_2d": 0.1}, batches=batches)
    before = sampler.hook.state_dict()
    next(batches)
    sampler.hook.on_after_forward(_state())   # no completion_advantages in the batch
    sampler.hook.on_step_end(_state())
    assert sampler.hook.state_dict() == before


# ---------------------------------------------------------------------------------------------- resume
def test_state_round_trip_continues_with_the_same_batches_and_weights():
    adv = {"add_1d": 0.2, "mul_1d": 0.7, "sub_2d": 1.3}
    full = _sampler(accum=2, window=5)
    drawn = _train(full, 12, adv)

    first = _sampler(accum=2, window=5)
    head = _train(first, 5, adv)
    saved = json.loads(json.dumps({"sampler": first.state_dict(), "hook": first.hook.state_dict()}))
    resumed = _sampler(accum=2, window=5)
    resumed.load_state_dict(saved["sampler"])
    resumed.hook.load_state_dict(saved["hook"])
    tail = _train(resumed, 7, adv)
    assert head + tail == drawn
    assert resumed.hook.state_dict() == full.hook.state_dict() and resumed.state_dict() == full.state_dict()
    assert len(resumed.hook.recent[0]) == 5  # the window is bounded after the reload too


def test_a_checkpoint_over_other_distributions_is_refused():
    sampler = _sampler()
    other = _sampler(["add_1d", "mul_1d"])
    with pytest.raises(ConfigError, match="distributions"):
        sampler.hook.load_state_dict(other.hook.state_dict())


# ---------------------------------------------------------------------------------------------- data and checks
def test_the_arithmetic_questions_split_into_distributions_by_operation_and_digits():
    assert domain_of("What is 37+5?", "operation_digits") == "add_2d"
    assert domain_of("What is 3*5?", "operation") == "mul"
    assert domain_of("What is 7-45?", "digits") == "2d"
    assert domain_of("What is 7-45?", "one") == "arithmetic_chat"


def test_prompt_rows_keep_their_conversations_domain(tmp_path):
    """dataset.format=prompts rows carry each question's distribution (they used to be labelled 'prompts' alike)."""
    import datasets
    import transformers

    from effitrain.data.chat_sources import _prompt_rows_by_domain, build_chat_demo
    from effitrain.data.tokenizer import train_bpe

    params = SimpleNamespace(max_docs_per_domain=120, eval_examples_per_domain=8, seed=0, max_digits=2,
                             answer_style="plain", format="prompts", domain_by="operation")
    train = build_chat_demo(params)["train"]
    train_bpe(datasets.Dataset.from_dict({"text": train["text"]}), 300, tmp_path)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    packed, domains = _prompt_rows_by_domain(train, tokenizer, 64)
    assert sorted(set(domains)) == ["add", "mul", "sub"] and len(domains) == len(packed.rows) == len(train)
    # row k of the packed prompts is the k-th question of its domain, and its label is that question's operation
    questions = [json.loads(m)[0]["content"] for m in train["messages"]]
    ordered = [q for d in ("add", "mul", "sub") for q, label in zip(questions, train["domain"]) if label == d]
    assert [domain_of(q, "operation") for q in ordered] == domains


def test_one_distribution_is_refused_with_the_way_to_split_it():
    with pytest.raises(ConfigError, match="domain_by"):
        DumpSampler(np.array(["prompts"] * 50), window=10, exploration=1.0, temperature=0.1, seed=0,
                    micro_batch_size=4, grad_accum=1, world_size=1, rank=0)


def test_dump_without_grpo_is_refused_at_check():
    composed = compose_config(["+recipe=sft", "curriculum=dump"])
    with pytest.raises(ConfigError, match="objective=grpo"):
        validate(composed.cfg)
    with pytest.raises(ConfigError, match="domain_by"):
        validate(compose_config(["+recipe=dump", "dataset.domain_by=one"]).cfg)
    validate(compose_config(["+recipe=dump"]).cfg)  # the recipe itself passes


@pytest.mark.slow
def test_sigkill_in_the_dump_stage_then_resume_repeats_the_losses_and_weights(tmp_path):
    """The recipe's GRPO stage, tiny, killed right after its step-3 checkpoint and resumed: steps 4-6 log the same
    losses, rewards and DUMP weights as the uninterrupted run (the weights moved off uniform, so the resumed draws
    depend on the restored windows and counts)."""
    from conftest import TINY, effitrain_cli, sigkill_at

    tiny = [o for o in TINY if not o.startswith(("train.max_steps=", "dataset.max_docs"))]
    run_args = [*tiny, "+recipe=dump", "dataset.max_docs_per_domain=200", "stages.0.train.max_steps=10",
                "stages.1.train.max_steps=6", "+stages.1.train.save_every=3", "stages.1.objective.group_size=4",
                "stages.1.objective.max_new_tokens=4", "stages.1.curriculum.window=8",
                # a model this small never answers right: the length reward gives the groups differing rewards
                "stages.1.objective.rewards=[{name:exact_answer,extract:boxed},{name:length,max_tokens:4,gated:false}]",
                "methods.answer_accuracy.examples=4", "train.keep_checkpoints=3"]

    def metrics(run_dir):
        lines = (run_dir / "stages" / "02-grpo" / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]

    full, killed = tmp_path / "full", tmp_path / "killed"
    result = effitrain_cli(*run_args, f"run_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = metrics(full)
    weights = [{k: v for k, v in m.items() if k.startswith("dump/p/")} for m in expected]
    assert len(weights[0]) == 6 and all(sum(w.values()) == pytest.approx(1.0) for w in weights)
    assert any(max(w.values()) > 0.3 for w in weights)  # moved off uniform (1/6)

    sigkill_at([*run_args, f"run_dir={killed}"],
               killed / "stages" / "02-grpo" / "checkpoints" / "step_00000003" / "COMPLETE")
    result = effitrain_cli("resume", str(killed))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = {m["step"]: m for m in metrics(killed)}
    assert sorted(resumed) == [m["step"] for m in expected] == list(range(1, 7))
    for m in expected[3:]:
        for key in ("loss", "reward", *[k for k in m if k.startswith("dump/")]):
            assert resumed[m["step"]][key] == pytest.approx(m[key], abs=1e-6), (m["step"], key)
