"""Every file in recipes/ composes, validates and trains a few steps on the tiny model.

The test is parametrized over the folder, so a new recipe is covered by being added.  A recipe that needs an input
says so in `recipe.requires`; the inputs this suite can provide are listed in RESOURCES.
"""

from __future__ import annotations

import math

import pytest
import yaml

from effitrain.config.compose import config_root, group_options

pytestmark = pytest.mark.slow

# requirement -> the key that takes it; the value is a small model trained by this suite (a real effitrain run).
# Selection recipes need no input: without a reference model they train a proxy on the pool themselves.
RESOURCES = {"pretrained_model": "model.path"}


@pytest.fixture(scope="session")
def small_trained_model(tmp_path_factory, train_in_process):
    run_dir = tmp_path_factory.mktemp("small-model") / "run"
    train_in_process(["train.max_steps=2"], run_dir)
    return run_dir / "final_model"


@pytest.mark.parametrize("name", group_options("recipe"))
def test_recipe_runs_a_few_steps(name, tmp_path, train_in_process, small_trained_model):
    meta = yaml.safe_load((config_root() / "recipe" / f"{name}.yaml").read_text())["recipe"]
    assert meta["name"] == name and meta["paper"] and meta["claim"] and "arxiv" in meta  # null for a baseline
    overrides = [f"+recipe={name}", "train.max_steps=3"]
    overrides += [f"{RESOURCES[r]}={small_trained_model}" for r in meta.get("requires", []) if r in RESOURCES]
    # a recipe that loads a pretrained model keeps that model's shape: the tiny-model overrides do not apply
    summary = train_in_process(overrides, tmp_path / "run", tiny_model="pretrained_model" not in meta["requires"])
    assert summary["finished"] and summary["steps"] == 3
    assert summary["recipe"] == [name]
    assert math.isfinite(summary["final_eval_loss"])
    assert 0 < summary["trainable_params"] <= summary["total_params"]
