"""The timeline: declared quantities resolve to exact steps; the mixture sampler draws domains with the declared
weights (within binomial sampling error) and resumes to the same batches; the sequence-length hook cuts packed rows
into the declared length, and in a real run the model sees those shapes; bad declarations are one-line errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from conftest import effitrain_cli
from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.curriculum.mixture import MixtureSampler
from effitrain.registry import ConfigError
from effitrain.timeline import Timeline, parse_timeline

DOMAINS = ["arithmetic", "code", "docstrings", "prose"]
BASE = {"prose": 0.4, "docstrings": 0.3, "code": 0.2, "arithmetic": 0.1}
UPSAMPLED = {"prose": 0.1, "docstrings": 0.1, "code": 0.4, "arithmetic": 0.4}


def _timeline(raw, *, max_steps=100, tokens_per_step=1024, seq_len=128) -> Timeline:
    return parse_timeline(raw, dataset_seq_len=seq_len, domains=DOMAINS).resolve(max_steps=max_steps,
                                                                                   tokens_per_step=tokens_per_step)


def _mixture(switch_at=0.5):
    return {"mixture": {"unit": "fraction", "points": [{"at": 0, "value": BASE},
                                                       {"at": switch_at, "value": UPSAMPLED}]}}


# -------------------------------------------------------------------------------------------- resolution
def test_units_resolve_to_the_first_step_at_or_after_the_breakpoint():
    tl = _timeline({
        "seq_len": {"unit": "tokens", "points": [{"at": 0, "value": 32}, {"at": 5000, "value": 64}]},
        "mixture": _mixture(0.8)["mixture"],
        "lr": {"unit": "step", "interpolate": "linear", "points": [{"at": 0, "value": 0.0}, {"at": 10, "value": 1.0}]},
        "phases": {"unit": "fraction", "intervals": {"warm": [0, 0.1], "anneal": [0.8, 1.0]}},
    }, max_steps=200, tokens_per_step=1024)
    # 5000 tokens: step 4 starts with 4096 seen, step 5 with 5120 >= 5000
    assert tl.points["seq_len"] == ((0, 32), (5, 64))
    assert tl.value("seq_len", 4) == 32 and tl.value("seq_len", 5) == 64
    assert tl.value("seq_len", tokens=5119) == 32 and tl.value("seq_len", tokens=5120) == 64
    # 0.8 of 200 steps is step 160 exactly (not 161 from 0.8 * 200 = 160.00000000000003)
    assert tl.points["mixture"][1][0] == 160
    assert tl.value("mixture", 159) == BASE and tl.value("mixture", 160) == UPSAMPLED
    assert tl.value("lr", 0) == 0.0 and tl.value("lr", 3) == pytest.approx(0.3, abs=1e-15)
    assert tl.value("lr", 10) == 1.0 and tl.value("lr", 199) == 1.0
    assert tl.phases == (("warm", 0, 20), ("anneal", 160, 200))
    assert [tl.phase(s) for s in (0, 19, 20, 159, 160, 199)] == ["warm", "warm", None, None, "anneal", "anneal"]
    assert tl.change_steps() == [0, 5, 10, 20, 160, 200]


def test_breakpoints_that_fall_on_one_step_keep_the_later_value():
    tl = _timeline({"seq_len": {"unit": "fraction", "points": [{"at": 0, "value": 32}, {"at": 0.5, "value": 64},
                                                               {"at": 0.6, "value": 128}]}}, max_steps=3)
    assert tl.points["seq_len"] == ((0, 32), (2, 128))  # 0.5*3 and 0.6*3 both round up to step 2


@pytest.mark.parametrize("raw, message", [
    ({"seqlen": {}}, r"^timeline\.seqlen: unknown quantity \(did you mean 'seq_len'\?\); valid: competence, distill_weight, lr, mixture, objective_weights, phases"),
    ({"batch_size": {}}, r"^timeline\.batch_size: not supported yet"),
    ({"seq_len": {"unit": "epochs", "points": []}}, r"^timeline\.seq_len\.unit: unknown unit 'epochs'; valid: "),
    ({"seq_len": {"unit": "step", "points": [{"at": 0, "value": 64}, {"at": 0, "value": 32}]}},
     r"^timeline\.seq_len\.points\[1\]\.at: breakpoints must be strictly increasing, 0 follows 0"),
    ({"seq_len": {"unit": "step", "points": [{"at": 5, "value": 64}]}},
     r"^timeline\.seq_len\.points\[0\]\.at: the first breakpoint must be at 0"),
    ({"seq_len": {"unit": "step", "points": [{"at": 0, "value": 48}]}},
     r"^timeline\.seq_len\.points\[0\]\.value: 48 does not divide the packed length dataset\.seq_len=128"),
    ({"seq_len": {"unit": "step", "interpolate": "linear", "points": [{"at": 0, "value": 64}]}},
     r"^timeline\.seq_len\.interpolate: unknown key"),
    ({"mixture": {"unit": "fraction", "points": [{"at": 0, "value": {"prose": 0.5, "code": 0.4}}]}},
     r"^timeline\.mixture\.points\[0\]\.value: the weights sum to 0\.9, not 1"),
    ({"mixture": {"unit": "fraction", "points": [{"at": 0, "value": {"prose": 0.5, "cod": 0.5}}]}},
     r"^timeline\.mixture\.points\[0\]\.value\.cod: unknown domain \(did you mean 'code'\?\)"),
    ({"mixture": {"unit": "fraction", "points": [{"at": 0, "value": {"prose": 1.0}}, {"at": 1.2, "value": {"code": 1.0}}]}},
     r"^timeline\.mixture\.points\[1\]\.at: 1\.2 is not a fraction of the run in \[0, 1\)"),
    ({"lr": {"unit": "step", "points": [{"at": 0, "value": -1}]}},
     r"^timeline\.lr\.points\[0\]\.value: an lr multiplier cannot be negative"),
    ({"phases": {"unit": "step", "intervals": {"a": [0, 10], "b": [5, 20]}}},
     r"^timeline\.phases\.intervals\.b: overlaps phase 'a'"),
])
def test_bad_timelines_are_one_line_errors_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_timeline(raw, dataset_seq_len=128, domains=DOMAINS)
    assert "\n" not in str(info.value)


def test_a_quantity_needs_the_block_that_reads_it():
    cfg = compose_config(["+timeline.lr={unit: step, points: [{at: 0, value: 1.0}]}"]).cfg
    with pytest.raises(ConfigError, match=r"^timeline\.lr: read only by scheduler=timeline, but scheduler=cosine"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^curriculum: 'mixture' follows timeline\.mixture, which is not declared"):
        validate(compose_config(["curriculum=mixture"]).cfg)


def test_cli_refuses_a_bad_timeline_in_one_line_with_exit_status_2(tmp_path):
    run_dir = tmp_path / "never"
    result = effitrain_cli("+recipe=domain_upsampling", "timeline.mixture.points.0.value.prose=0.9",
                           f"run_dir={run_dir}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "effitrain: error: timeline.mixture.points[0].value: the weights sum to 1.5, not 1"]
    assert not run_dir.exists()


# -------------------------------------------------------------------------------------------- mixture sampler
def _sampler(timeline, *, rows_per_domain=400, micro=8, accum=2, world=1, rank=0, seed=3):
    labels = np.repeat(np.array(DOMAINS), rows_per_domain)
    return MixtureSampler(labels, timeline, seed=seed, micro_batch_size=micro, grad_accum=accum, world_size=world,
                          rank=rank)


def _within_binomial_bounds(counts: dict, weights: dict, n: int, z: float = 4.5) -> list[str]:
    """Domains whose count is further than z standard deviations from n * weight (z = 4.5: a false alarm in fewer
    than one in 100,000 checks)."""
    bad = []
    for d in DOMAINS:
        p = weights.get(d, 0.0)
        if abs(counts.get(d, 0) - n * p) > z * math.sqrt(n * p * (1 - p)) + 1e-9:
            bad.append(f"{d}: {counts.get(d, 0)} of {n}, expected {n * p:.0f}")
    return bad


def test_observed_domain_frequencies_follow_the_timeline_before_and_after_the_switch():
    tl = _timeline(_mixture(0.5), max_steps=200)
    sampler = _sampler(tl)
    labels = np.repeat(np.array(DOMAINS), 400)
    batches = iter(sampler)
    per_step = [np.concatenate([next(batches) for _ in range(2)]) for _ in range(200)]  # 16 rows per step
    for window, weights in ((range(0, 100), BASE), (range(100, 200), UPSAMPLED)):
        rows = np.concatenate([per_step[s] for s in window])
        counts = dict(zip(*np.unique(labels[rows], return_counts=True)))
        assert not _within_binomial_bounds(counts, weights, len(rows)), (window, counts)
    # the two windows are told apart: arithmetic goes from 10% to 40% of 1600 rows (160 vs 640, sd ~ 12 and 20)
    arith = [np.isin(np.concatenate(per_step[a:a + 100]), np.flatnonzero(labels == "arithmetic")).sum()
             for a in (0, 100)]
    assert arith[0] < 250 < 500 < arith[1]


def test_rows_of_a_domain_do_not_repeat_before_the_domain_is_used_up():
    tl = _timeline({"mixture": {"unit": "step", "points": [{"at": 0, "value": {"code": 1.0}}]}})
    sampler = _sampler(tl, rows_per_domain=40, micro=4, accum=1)
    batches = iter(sampler)
    first = np.concatenate([next(batches) for _ in range(10)])   # 40 rows: code's whole stream once
    second = np.concatenate([next(batches) for _ in range(10)])
    code_rows = set(range(40, 80))  # the label array is sorted: arithmetic 0-39, code 40-79, ...
    assert set(first.tolist()) == code_rows and set(second.tolist()) == code_rows
    assert first.tolist() != second.tolist()  # a fresh permutation for the domain's second pass


def test_one_process_with_accumulation_sees_the_rows_of_two_processes():
    tl = _timeline(_mixture(0.5), max_steps=20)
    one = iter(_sampler(tl, micro=4, accum=2, world=1))
    two = [iter(_sampler(tl, micro=4, accum=1, world=2, rank=r)) for r in (0, 1)]
    for _ in range(20):
        assert next(one) + next(one) == next(two[0]) + next(two[1])


@pytest.mark.parametrize("stop_after", [7, 8, 47])  # mid-step (micro 1 of 2), at a step boundary, after the switch
def test_state_dict_round_trip_continues_with_the_same_batches(stop_after):
    tl = _timeline(_mixture(0.2), max_steps=100)
    reference = iter(_sampler(tl))
    expected = [next(reference) for _ in range(stop_after + 30)]

    interrupted = _sampler(tl)
    batches = iter(interrupted)
    seen = [next(batches) for _ in range(stop_after)]
    state = copy.deepcopy(interrupted.state_dict())  # what a checkpoint keeps (plain data)
    resumed = _sampler(tl)
    resumed.load_state_dict(state)
    seen += [b for b, _ in zip(iter(resumed), range(30))]
    assert seen == expected


def test_resuming_with_another_global_batch_is_refused():
    tl = _timeline(_mixture(0.5))
    sampler = _sampler(tl)
    next(iter(sampler))
    other = _sampler(tl, accum=1)
    with pytest.raises(ConfigError, match=r"^resume: the checkpoint's global batch \(16 sequences\) differs"):
        other.load_state_dict(sampler.state_dict())


def test_a_mixture_domain_without_training_rows_is_refused():
    tl = _timeline(_mixture(0.5))
    with pytest.raises(ConfigError, match=r"^timeline\.mixture: domain 'arithmetic' has no packed training rows"):
        MixtureSampler(np.array(["code", "prose"] * 40), tl, seed=0, micro_batch_size=4, grad_accum=1,
                       world_size=1, rank=0)


# -------------------------------------------------------------------------------------------- hooks
def test_sequence_length_hook_cuts_rows_into_the_declared_length():
    import torch

    from effitrain.timeline_hooks import SequenceLengthHook

    tl = _timeline({"seq_len": {"unit": "step", "points": [{"at": 0, "value": 8}, {"at": 2, "value": 4}]}},
                   seq_len=8)
    hook = SequenceLengthHook(tl)
    ids = torch.arange(16).reshape(2, 8)

    class State:
        step = 0
        batch = {"input_ids": ids, "labels": ids}

    state = State()
    hook.on_batch_start(state)
    assert state.batch["input_ids"] is ids  # step 0: the packed length, untouched
    state.step = 2
    hook.on_batch_start(state)
    assert state.batch["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert torch.equal(state.batch["labels"], state.batch["input_ids"])


def test_resumed_timeline_must_have_the_same_past_and_may_change_the_future():
    from effitrain.timeline_hooks import TimelineRecord

    def record(at: float, max_steps: int):
        return TimelineRecord(_timeline(_mixture(at), max_steps=max_steps))

    saved = record(0.5, 100)
    saved.step = 40
    state = saved.state_dict()
    record(0.5, 200).load_state_dict(state)  # the switch moves from step 50 to 100: still in the future
    with pytest.raises(ConfigError, match=r"^timeline: the resumed run's timeline differs before the checkpoint's "
                                          r"step 40 \(mixture at step 30:"):
        record(0.3, 100).load_state_dict(state)


def test_timeline_scheduler_follows_the_declared_multipliers():
    import torch

    from effitrain.optim.schedules import build

    cfg = compose_config(["scheduler=timeline", "optimizer.lr=0.01", "train.max_steps=10",
                          "+timeline.lr={unit: step, interpolate: linear, "
                          "points: [{at: 0, value: 0.0}, {at: 4, value: 1.0}, {at: 8, value: 0.5}]}"]).cfg
    spec = validate(cfg)
    tl = spec.timeline.resolve(max_steps=10, tokens_per_step=1024)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = build(spec.block("scheduler").params, opt, max_steps=10, timeline=tl)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.00875, 0.0075, 0.00625, 0.005, 0.005]  # lr x multiplier
    assert lrs == pytest.approx(expected, abs=1e-12)


# -------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_run_shows_the_model_the_scheduled_lengths_and_mixture(tmp_path, train_in_process, monkeypatch):
    """Four steps of the tiny model: a spy on the model's forward records what it is given while training."""
    import torch
    import transformers

    seen = []
    forward = transformers.LlamaForCausalLM.forward

    def spy(self, input_ids=None, **kw):
        if torch.is_grad_enabled():  # training forwards (evaluation runs under no_grad at the packed length)
            seen.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", spy)
    summary = train_in_process([
        "curriculum=mixture",
        "+timeline.seq_len={unit: step, points: [{at: 0, value: 64}, {at: 2, value: 32}, {at: 3, value: 16}]}",
        "+timeline.mixture={unit: step, points: [{at: 0, value: {code: 1.0}}, {at: 2, value: {prose: 1.0}}]}",
        "+timeline.phases={unit: step, intervals: {code_only: [0, 2]}}",
    ], tmp_path / "run")
    assert summary["finished"]
    assert seen == [(4, 64), (4, 64), (8, 32), (16, 16)]  # micro-batch 4 x 64 tokens: 256 tokens every step


@pytest.mark.slow
def test_a_resumed_mixture_run_logs_the_losses_of_the_uninterrupted_one(tmp_path, train_in_process):
    """Six steps in one go vs three steps, then `resume=auto` with train.max_steps=6: the same later losses need the
    same batches (the sampler's state) and the same timeline (its record in the checkpoint)."""
    import json

    run = ["curriculum=mixture", "scheduler=constant", "train.save_every=3",
           "+timeline.mixture={unit: step, points: [{at: 0, value: {code: 0.7, prose: 0.3}}, "
           "{at: 4, value: {arithmetic: 0.5, prose: 0.5}}]}",
           "+timeline.seq_len={unit: step, points: [{at: 0, value: 64}, {at: 2, value: 32}]}"]

    def losses(run_dir):
        return {l["step"]: l["loss"] for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in l}

    full, split = tmp_path / "full", tmp_path / "split"
    assert train_in_process([*run, "train.max_steps=6"], full)["finished"]
    assert train_in_process([*run, "train.max_steps=3"], split)["finished"]
    assert train_in_process([*run, "train.max_steps=6", "resume=auto"], split)["finished"]
    assert losses(split) == losses(full) and sorted(losses(full)) == [1, 2, 3, 4, 5, 6]
