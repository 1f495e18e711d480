"""Learning-rate schedules, as multipliers of the peak lr per optimizer step."""

from __future__ import annotations

import math

import pytest

from effitrain.optim.schedules import Constant, Cosine, WarmupStableDecay


def test_cosine_warms_up_then_decays_to_the_floor():
    f = Cosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)          # (0 + 1) / 10
    assert f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_wsd_holds_the_peak_and_decays_only_at_the_end():
    f = WarmupStableDecay(warmup_steps=10, max_steps=100, min_ratio=0.1, decay_steps=10, shape="exp")
    assert [f(s) for s in range(10, 90)] == [1.0] * 80
    decay = [f(s) for s in range(90, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1)
    # exponential: equal ratios between consecutive steps
    ratios = [b / a for a, b in zip(decay, decay[1:])]
    assert max(ratios) - min(ratios) < 1e-9


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_decay_shapes_end_at_the_floor(shape):
    f = WarmupStableDecay(warmup_steps=0, max_steps=50, min_ratio=0.2, decay_steps=5, shape=shape)
    assert f(44) == 1.0 and f(49) == pytest.approx(0.2)


def test_rewarming_starts_from_the_given_ratio():
    f = Cosine(warmup_steps=10, max_steps=100, min_ratio=0.1, start_ratio=0.5)
    assert f(0) == pytest.approx(0.5 + 0.5 * 0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1)


def test_constant_after_warmup():
    f = Constant(warmup_steps=4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert not math.isnan(Constant(0)(0))
