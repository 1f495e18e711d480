"""Skill-It (curriculum: skill_it): the multiplicative-weights rule on hand-computed values, weights that move
towards the domains a crafted loss signal says are behind, draws that follow the weights, and a resume (state
round trip and one real kill-and-resume) that continues with the same batches and weights."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.curriculum.skill_it import SkillItSampler, multiplicative_weights, skills_graph
from effitrain.registry import ConfigError

DOMAINS = ["arithmetic", "code", "docstrings", "prose"]  # sorted, as the sampler orders them


def _sampler(*, eta=0.5, update_every=10, window=3, graph="identity", edges=None, prior=None, micro=8, accum=1,
             seed=3) -> SkillItSampler:
    labels = np.repeat(np.array(DOMAINS), 400)
    return SkillItSampler(labels, prior=prior, graph=graph, edges=edges or {}, eta=eta, update_every=update_every,
                          window=window, seed=seed, micro_batch_size=micro, grad_accum=accum, world_size=1, rank=0)


def _eval(step: int, losses: dict[str, float], max_steps: int = 1000) -> SimpleNamespace:
    """The part of the engine's State the hook reads at eval_end."""
    return SimpleNamespace(step=step, spec=SimpleNamespace(train=SimpleNamespace(max_steps=max_steps)),
                           eval_metrics={f"eval_loss/{d}": v for d, v in losses.items()})


# ------------------------------------------------------------------------------------------------ the update rule
def test_update_is_prior_times_exp_eta_graph_losses_normalised():
    weights = multiplicative_weights(np.ones(2), np.eye(2), np.array([1.0, 2.0]), eta=0.5)
    z = math.exp(0.5) + math.exp(1.0)
    assert weights.tolist() == pytest.approx([math.exp(0.5) / z, math.exp(1.0) / z], rel=1e-12)
    # the prior multiplies; an edge i -> j adds A[i, j] * L_j to skill i's exponent
    weights = multiplicative_weights(np.array([2.0, 1.0]), np.array([[1.0, 0.5], [0.0, 1.0]]),
                                     np.array([1.0, 2.0]), eta=1.0)
    a, b = 2.0 * math.exp(1.0 + 0.5 * 2.0), 1.0 * math.exp(2.0)
    assert weights.tolist() == pytest.approx([a / (a + b), b / (a + b)], rel=1e-12)


def test_first_distribution_is_the_authors_loss_init_prior():
    assert _sampler().hook.weights.tolist() == pytest.approx([0.25] * 4)  # identity graph, prior 1: uniform
    hook = _sampler(graph="declared", edges={"docstrings": {"code": 1.0}}, eta=0.5).hook
    z = 3 + math.exp(0.5)  # docstrings' row of A sums to 2: exp(0.5 * 2) against exp(0.5 * 1) for the others
    assert hook.weights.tolist() == pytest.approx([1 / z, 1 / z, math.exp(0.5) / z, 1 / z])


def test_weights_move_towards_the_domain_whose_eval_loss_is_high():
    hook = _sampler(update_every=10, window=3).hook
    behind = {"arithmetic": 2.0, "code": 4.0, "docstrings": 2.0, "prose": 2.0}  # code lags
    for step in (0, 10):
        hook.on_eval_end(_eval(step, behind))
    w = hook.weights
    assert w[1] > 0.25 > w[0] and w[0] == pytest.approx(w[2]) == pytest.approx(w[3])
    # the window sums the two evaluations seen: exponent 0.5 * 2 * (4 - 2) = 2 between code and each other domain
    assert w[1] / w[0] == pytest.approx(math.exp(2.0), rel=1e-12)


def test_a_declared_edge_raises_the_prerequisite_of_a_lagging_domain():
    """docstrings -> code: when only code lags, docstrings (which helps code) gains weight over prose and
    arithmetic, whose losses are the same as docstrings'."""
    hook = _sampler(graph="declared", edges={"docstrings": {"code": 0.5}}, update_every=5, eta=0.2).hook
    hook.on_eval_end(_eval(5, {"arithmetic": 1.0, "code": 3.0, "docstrings": 1.0, "prose": 1.0}))
    w = dict(zip(DOMAINS, hook.weights))
    assert w["code"] > w["docstrings"] > w["prose"] == pytest.approx(w["arithmetic"])
    assert w["docstrings"] / w["prose"] == pytest.approx(math.exp(0.2 * 0.5 * 3.0), rel=1e-12)


def test_only_the_last_window_evaluations_count_and_updates_fall_on_update_every():
    hook = _sampler(update_every=20, window=2).hook
    flat = {d: 1.0 for d in DOMAINS}
    hook.on_eval_end(_eval(0, {**flat, "prose": 9.0}))  # leaves the window before the update at 20
    state = _eval(10, flat)
    hook.on_eval_end(state)
    assert hook.updates == 0 and "mixture/prose" not in state.eval_metrics  # 10 is not an update step
    state = _eval(20, {**flat, "code": 2.0})
    hook.on_eval_end(state)
    assert hook.updates == 1 and hook.losses == [[1.0] * 4, [1.0, 2.0, 1.0, 1.0]]
    w = hook.weights
    assert w[1] / w[3] == pytest.approx(math.exp(0.5 * 1.0)) and w[3] == pytest.approx(w[0])
    # the update's weights are logged on the evaluation's line, with the count of updates
    assert state.eval_metrics["mixture/code"] == pytest.approx(w[1]) and state.eval_metrics["mixture_updates"] == 1


def test_no_update_at_the_final_evaluation():
    hook = _sampler(update_every=10).hook
    hook.on_eval_end(_eval(100, {**{d: 1.0 for d in DOMAINS}, "code": 5.0}, max_steps=100))
    assert hook.updates == 0 and hook.weights.tolist() == pytest.approx([0.25] * 4)


# ------------------------------------------------------------------------------------------------ the draws
def _run(sampler: SkillItSampler, steps: int, start: int = 0) -> list[list[int]]:
    """Train-loop order: a step's batch, then at every 5th step an evaluation whose per-domain losses are a fixed
    function of the step (so a resumed run sees the same signal as the uninterrupted one)."""
    hook, seen, rows = sampler.hook, [], iter(sampler)
    for step in range(start, start + steps):
        seen.append(next(rows))
        if (step + 1) % 5 == 0:
            hook.on_eval_end(_eval(step + 1, {d: 3.0 + math.sin((step + 1) * (i + 1)) for i, d in enumerate(DOMAINS)}))
    return seen


def test_draws_follow_the_updated_weights_within_sampling_error():
    sampler = _sampler(update_every=10, micro=16)
    hook = sampler.hook
    hook.on_eval_end(_eval(10, {"arithmetic": 1.0, "code": 1.0, "docstrings": 1.0, "prose": 4.0}))  # prose lags
    p = hook.weights
    assert p[3] > 0.5
    domain_of = np.repeat(np.arange(4), 400)
    drawn = np.bincount(np.concatenate([domain_of[b] for b, _ in zip(iter(sampler), range(200))]), minlength=4)
    n = drawn.sum()
    assert all(abs(drawn[k] - n * p[k]) <= 4.5 * math.sqrt(n * p[k] * (1 - p[k])) for k in range(4)), (drawn, p)


@pytest.mark.parametrize("stop_after", [7, 10, 23])
def test_state_round_trip_continues_with_the_same_batches_and_weights(stop_after):
    full = _sampler(update_every=10)
    expected = _run(full, 40)
    first = _sampler(update_every=10)
    seen = _run(first, stop_after)
    sampler_state, hook_state = first.state_dict(), first.hook.state_dict()
    resumed = _sampler(update_every=10)
    resumed.load_state_dict(sampler_state)
    resumed.hook.load_state_dict(json.loads(json.dumps(hook_state)))  # plain data, as in a checkpoint
    seen += _run(resumed, 40 - stop_after, start=stop_after)
    assert seen == expected
    assert resumed.hook.weights.tolist() == full.hook.weights.tolist() and full.hook.updates == 4


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_skill_it_configs_are_one_line_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"^curriculum.edges: domain 'math' is not a domain of the training data"):
        _sampler(graph="declared", edges={"math": {"code": 1.0}})
    with pytest.raises(ConfigError, match=r"^curriculum.edges: set only with curriculum.graph=declared"):
        skills_graph(DOMAINS, "identity", {"code": {"prose": 1.0}})
    with pytest.raises(ConfigError, match=r"^curriculum.edges: graph=declared needs the edges"):
        _sampler(graph="declared")
    with pytest.raises(ConfigError, match=r"^curriculum.prior: domain 'web'"):
        _sampler(prior={"web": 2.0})
    with pytest.raises(ConfigError, match=r"\[skill_it_updates_at_evaluations\]: curriculum.update_every=40 needs "
                                          r"an evaluation at each update, but train.eval_every=0"):
        composed = compose_config(["+recipe=skill_it", "train.eval_every=0"])
        validate(composed.cfg, composed.recipes)
    with pytest.raises(ConfigError, match=r"\[skill_it_names_known_domains\]: curriculum.edges: domain 'math' is not "
                                          r"a domain of the data; valid: arithmetic, code, docstrings, prose$"):
        composed = compose_config(["+recipe=skill_it", "curriculum.graph=declared",
                                   "curriculum.edges={math: {code: 1.0}}"])
        validate(composed.cfg, composed.recipes)
    with pytest.raises(ConfigError, match=r"curriculum.graph"):
        composed = compose_config(["+recipe=skill_it", "curriculum.graph=estimated"])
        validate(composed.cfg, composed.recipes)


# ------------------------------------------------------------------------------------------------ a real run
@pytest.mark.slow
def test_a_resumed_skill_it_run_continues_with_the_weights_and_batches_of_the_uninterrupted_one(
        tmp_path, train_in_process):
    """Six steps with an update every 2; then the same run as if killed right after its step-4 checkpoint (the
    later checkpoint and log lines removed) is resumed: its steps 5-6 log the same losses, and its final checkpoint
    holds the same Skill-It weights, loss window and per-domain row counters as the uninterrupted run's."""
    import shutil

    import torch

    run = ["+recipe=skill_it", "curriculum.update_every=2", "train.eval_every=2", "scheduler=constant",
           "train.save_every=4", "curriculum.eta=5.0", "train.max_steps=6"]

    def lines(run_dir):
        return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def final_state(run_dir):
        client = torch.load(run_dir / "checkpoints" / "step_00000006" / "state.pt", weights_only=False)
        return client["hooks"]["skill_it"], client["sampler"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert train_in_process(run, full)["finished"]
    weights = {l["step"]: {k: v for k, v in l.items() if k.startswith("mixture/")} for l in lines(full)
               if "mixture/code" in l}
    assert sorted(weights) == [0, 2, 4]  # the start, then every update inside the run (none at the last step)
    assert weights[2] != weights[0] and weights[4] != weights[2]  # the domains' eval losses differ: weights moved

    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "step_00000006")
    (killed / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines(full) if l["step"] <= 4))
    assert train_in_process([*run, "resume=auto"], killed)["finished"]
    losses = {l["step"]: l["loss"] for l in lines(full) if "loss" in l}
    assert {l["step"]: l["loss"] for l in lines(killed) if "loss" in l} == losses and sorted(losses) == [*range(1, 7)]
    hook, sampler = final_state(killed)
    assert (hook, sampler) == final_state(full) and hook["updates"] == 2 and sampler["step"] == 6
