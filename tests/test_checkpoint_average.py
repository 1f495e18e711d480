"""methods.checkpoint_average: which steps are averaged, the three weightings against hand-computed averages, the
average replacing the model at the last step, and a resume between snapshots continuing the same average."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from effitrain.methods.checkpoint_average import CheckpointAverage, snapshot_steps


def run_steps(hook: CheckpointAverage, model: torch.nn.Module, steps: range, max_steps: int) -> None:
    """Set the single weight to the step number (theta_s = s), then end the step as the loop does."""
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        hook.on_step_end(SimpleNamespace(step=step, model=model, metrics={},
                                         spec=SimpleNamespace(train=SimpleNamespace(max_steps=max_steps))))


def linear() -> torch.nn.Module:
    return torch.nn.Linear(1, 1, bias=False)


def test_snapshots_are_the_last_count_steps_every_apart():
    assert snapshot_steps(100, 6, 2) == [90, 92, 94, 96, 98, 100]
    assert snapshot_steps(5, 4, 2) == [1, 3, 5]            # a run too short for all: the ones after step 0
    # with every null, the snapshots span `window` of the run: 10% of 100 steps over 5 gaps = every 2 steps
    assert CheckpointAverage(6, None, 0.1, "ema", 0.2).interval(100) == 2


@pytest.mark.parametrize("weighting, expected", [
    ("sma", (8 + 9 + 10) / 3),
    ("wma", (1 * 8 + 2 * 9 + 3 * 10) / 6),
    ("ema", 0.2 * 10 + 0.8 * (0.2 * 9 + 0.8 * 8)),          # alpha = 0.2 on each newer snapshot
])
def test_the_final_model_is_the_weighted_average_of_the_snapshots(weighting, expected):
    model = linear()
    hook = CheckpointAverage(3, 1, 0.1, weighting, 0.2)
    run_steps(hook, model, range(1, 11), max_steps=10)       # snapshots of theta = 8, 9, 10
    assert hook.taken == [8, 9, 10]
    assert model.weight.item() == pytest.approx(expected)


def test_resume_between_snapshots_continues_the_same_average():
    uninterrupted = linear()
    hook = CheckpointAverage(4, 2, 0.1, "ema", 0.2)          # snapshots at 14, 16, 18, 20
    run_steps(hook, uninterrupted, range(1, 21), max_steps=20)

    first = CheckpointAverage(4, 2, 0.1, "ema", 0.2)
    run_steps(first, linear(), range(1, 18), max_steps=20)   # stopped at step 17: two snapshots in the average
    saved = first.state_dict()
    assert saved["taken"] == [14, 16]
    resumed_model = linear()
    resumed = CheckpointAverage(4, 2, 0.1, "ema", 0.2)
    resumed.load_state_dict(saved)
    run_steps(resumed, resumed_model, range(18, 21), max_steps=20)
    assert resumed_model.weight.item() == uninterrupted.weight.item() == pytest.approx(
        0.2 * 20 + 0.8 * (0.2 * 18 + 0.8 * (0.2 * 16 + 0.8 * 14)))
