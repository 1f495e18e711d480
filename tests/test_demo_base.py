"""Fine-tuning recipes fine-tune something: with no model named, `model=demo_base` pre-trains a base model on the
run's data first (a real effitrain run, cached), so the adapter starts from a model that has learned the data."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _first_eval(run):
    return next(json.loads(l)["eval_loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
                if "eval_loss" in l)


def test_a_peft_recipe_adapts_a_base_pre_trained_on_the_data_and_reuses_it(tmp_path, train_in_process, capsys):
    scratch = tmp_path / "scratch"
    train_in_process(["+recipe=lora", "model=tiny_llama", "train.max_steps=2"], scratch)  # random init, as before
    capsys.readouterr()

    first = tmp_path / "first"
    train_in_process(["+recipe=lora", "model.base_steps=60", "train.max_steps=2"], first)
    out = capsys.readouterr().out
    assert "a base model is pre-trained on this run's data first: 60 steps" in out
    # the adapter run starts where the base model's pre-training ended, far below a random model's loss
    assert _first_eval(first) < _first_eval(scratch) - 1.0

    second = tmp_path / "second"
    train_in_process(["+recipe=lisa", "model.base_steps=60", "train.max_steps=2"], second)
    assert "reusing the base model pre-trained on this data" in capsys.readouterr().out
    assert _first_eval(second) == pytest.approx(_first_eval(first), abs=1e-6)   # the same cached base model
    assert not (second / "base_models").exists()
