"""Every data-selection recipe composes, selects and trains a few steps end to end on the tiny model.

A recipe is a selection recipe when its defaults override ``/selection``.  None needs an input: the scorers that read
a reference model train a small proxy on the pool when ``selection.scorer.model_path`` is not given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from effitrain.config.tree import config_root

RECIPE_DIR = config_root() / "recipe"


def _selection_option(recipe: dict) -> str | None:
    for entry in recipe.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("override", "").strip().lstrip("/") == "selection":
                    return value
    return None


def _recipes() -> list[str]:
    out = []
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if _selection_option(yaml.safe_load(path.read_text()) or {}):
            out.append(path.stem)
    return out


# Keep the model-based scorers to seconds: fewer proxy steps, shorter inputs.
FAST = {
    "loss_trajectory": ["selection.scorer.proxy_epochs=1", "selection.scorer.checkpoints=2",
                        "selection.scorer.max_length=48", "selection.scorer.num_clusters=3"],
    "less": ["selection.scorer.proxy_steps=4", "selection.scorer.warmup_epochs=2", "selection.scorer.max_length=48",
             "selection.scorer.proj_dim=32", "selection.scorer.max_target=4"],
    "perplexity": ["selection.scorer.max_length=48", "selection.scorer.proxy_steps=4"],
    "embedding_kmeans": ["selection.scorer.max_length=48", "selection.scorer.num_clusters=3",
                         "selection.scorer.proxy_steps=4"],
    "zip_fit": ["selection.scorer.max_target=4", "selection.scorer.max_chars=400"],
    "rds_plus": ["selection.scorer.max_length=48", "selection.scorer.proxy_steps=4"],
    "facility_location": ["selection.scorer.max_length=48", "selection.scorer.proxy_steps=4",
                          "selection.scorer.partition_size=200"],
    "got_d": ["selection.scorer.max_length=48", "selection.scorer.proxy_steps=4"],
}


def test_every_selection_option_has_a_recipe():
    options = {p.stem for p in (config_root() / "selection").glob("*.yaml")} - {"none"}
    used = {_selection_option(yaml.safe_load(p.read_text())) for p in RECIPE_DIR.glob("*.yaml")}
    assert options <= used, options - used


@pytest.mark.parametrize("name", _recipes())
def test_selection_recipe_trains(name, train_in_process, tmp_path):
    recipe = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())
    option = _selection_option(recipe)
    sel_cfg = yaml.safe_load((config_root() / "selection" / f"{option}.yaml").read_text())
    overrides = [f"+recipe={name}"]
    if sel_cfg.get("target"):
        overrides.append("selection.target.max_examples=8")
    overrides += FAST.get(sel_cfg["scorer"]["name"], [])
    assert not recipe["recipe"].get("requires"), "a selection recipe must run with no extra key"
    summary = train_in_process(overrides, tmp_path / "run")
    info = summary["selection"]
    assert info["method"] == option and info["kept_examples"] > 0
    manifest = Path(summary["selection_manifest"])
    header = json.loads(manifest.read_text())
    assert header["method"] == option
    assert sum(1 for _ in open(manifest.parent / "selected.jsonl")) == info["kept_examples"]


def test_select_verb_then_training_reuses_the_manifest(train_in_process, tmp_path, capsys):
    from conftest import TINY

    from effitrain.selection.stage import select_main

    data = [o for o in TINY if o.startswith("dataset.")]
    overrides = ["selection=dsir", "selection.target.max_examples=8", "selection.budget.fraction=0.3"]
    assert select_main(["--json", *data, *overrides]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cache_hit"] is False and Path(first["manifest"]).is_file()
    assert first["kept_token_fraction"] >= 0.3

    summary = train_in_process(overrides, tmp_path / "run")
    assert summary["selection"]["cache_hit"] is True
    assert summary["selection_manifest"] == first["manifest"]
    capsys.readouterr()  # the training run's log lines

    # an input change (the budget) is a new manifest
    assert select_main(["--json", *data, *overrides[:-1], "selection.budget.fraction=0.2"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cache_hit"] is False and second["manifest"] != first["manifest"]


def test_select_verb_config_error_exits_2(capsys):
    from effitrain.selection.stage import select_main

    assert select_main(["selection=dsir", "selection.scorer.num_bucket=5"]) == 2
    assert "selection.scorer.num_bucket: unknown key (did you mean 'num_buckets'?)" in capsys.readouterr().err
