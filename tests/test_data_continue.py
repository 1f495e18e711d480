"""A stage that continues the previous stage's data stream (``data: continue``; G_stack's grown model trains on the
batches after the small model's last one, as the authors' ``--resume_id`` skips the data the small model saw).

The mechanism: the sampler starts from the previous run's newest checkpoint's sampler state, so its first batch is
the one the previous run would have drawn next; a refusal (other data, no checkpoint, a first stage) is one line
naming the key, before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch

from effitrain.config.stages import parse_stages
from effitrain.curriculum.samplers import ShuffleSampler
from effitrain.engine.checkpoint import write_atomically
from effitrain.run_layout import CHECKPOINTS
from effitrain.registry import ConfigError
from effitrain.train import continue_data_stream

LAYOUT = dict(seed=3, micro_batch_size=4, grad_accum=2, world_size=1, rank=0)


def _run_with_sampler_at(tmp_path, sampler, name="previous"):
    """A run directory whose newest (verified) checkpoint holds ``sampler``'s state, as the loop saves it."""
    run = tmp_path / name
    write_atomically(run / CHECKPOINTS, 7, lambda tmp: torch.save({"sampler": sampler.state_dict()}, tmp / "state.pt"))
    return run


def test_the_continued_sampler_draws_the_batches_the_previous_run_would_have_drawn_next(tmp_path):
    previous = ShuffleSampler(100, **LAYOUT)
    stream = iter(previous)
    seen = [next(stream) for _ in range(15)]          # crosses an epoch: 100 // 8 = 12 steps = 24 micro-batches
    run = _run_with_sampler_at(tmp_path, previous)
    upcoming = [next(stream) for _ in range(12)]
    fresh = ShuffleSampler(100, **LAYOUT)
    continued = ShuffleSampler(100, **LAYOUT)
    continue_data_stream(continued, run)
    assert [b for _, b in zip(range(12), iter(continued))] == upcoming
    assert [b for _, b in zip(range(15), iter(fresh))] == seen           # a fresh stage re-reads them instead


def test_a_run_whose_data_differs_or_that_left_no_checkpoint_is_refused_in_one_line(tmp_path):
    run = _run_with_sampler_at(tmp_path, ShuffleSampler(100, **LAYOUT))
    with pytest.raises(ConfigError) as caught:
        continue_data_stream(ShuffleSampler(90, **LAYOUT), run)
    assert str(caught.value).startswith(f"train.continue_data_from: this run's data cannot continue {run}'s: the "
                                        f"checkpoint's sampler counted 100 packed training sequences, this run has 90")
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^train.continue_data_from: .*empty has no complete checkpoint"):
        continue_data_stream(ShuffleSampler(100, **LAYOUT), tmp_path / "empty")


def test_the_stage_key_is_checked():
    stages = parse_stages([{"name": "small"}, {"name": "big", "data": "continue"}])
    assert [s.data for s in stages] == ["fresh", "continue"]
    with pytest.raises(ConfigError, match=r"^stages\.small\.data: the first stage has no previous stage"):
        parse_stages([{"name": "small", "data": "continue"}])
    with pytest.raises(ConfigError, match=r"^stages\.big\.data: expected 'fresh' .* or 'continue' .*, got 'more'"):
        parse_stages([{"name": "small"}, {"name": "big", "data": "more"}])


@pytest.mark.slow
def test_g_stack_s_stacked_stage_trains_on_the_batches_after_the_small_stage_s(tmp_path, train_in_process):
    """The recipe's two stages, 3 + 2 steps: the stacked stage's sampler ends 5 micro-batches into the stream (2 with
    a fresh stream), and the pipeline wrote the previous stage's folder into the stage's config."""
    import yaml

    summary = train_in_process(["+recipe=g_stack", "stages.0.train.max_steps=3", "stages.1.train.max_steps=2",
                                "model.num_layers=4", "stages.0.model.num_layers=1"], tmp_path / "run")
    assert summary["finished"]
    stages = tmp_path / "run" / "stages"
    config = yaml.safe_load((stages / "02-stacked" / "config.yaml").read_text())
    assert config["train"]["continue_data_from"] == str(stages / "01-small")

    def sampler_position(stage):
        newest = sorted((stages / stage / CHECKPOINTS).glob("step_*"))[-1]
        state = torch.load(newest / "state.pt", weights_only=False)["sampler"]
        return state["epoch"], state["position"]
    assert sampler_position("01-small") == (0, 3)
    assert sampler_position("02-stacked") == (0, 5)
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert [r["steps"] for r in rows] == [3, 2]
