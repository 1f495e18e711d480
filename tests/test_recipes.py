"""Every file in recipes/ composes, validates and trains a few steps on the tiny model, with no override but the
run length: a recipe runs out of the box on the built-in corpus.

The test is parametrized over the folder, so a new recipe is covered by being added.  Recipes that need a model to
start from use ``model=demo_base`` (a base pre-trained on the run's data first, cached: trained once here and reused
by the others); selection recipes without a reference model train a proxy on the pool.
"""

from __future__ import annotations

import math
import os

import pytest
import yaml

from effitrain.config.tree import config_root, group_options
from effitrain.registry import ConfigError

pytestmark = pytest.mark.slow


def _fp8_gpu() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# A recipe whose preparation trains a model of its own (a selection or scoring proxy) keeps it to a few steps here: the recipe
# still runs end to end through its real scorer; what the scorer computes is tested in its own module
# (tests/test_selection_recipes.py, tests/test_selection.py), at sizes chosen for that.
SMALL_PREPARATION = {
    "diversity_kmeans": ["selection.scorer.proxy_steps=4", "selection.scorer.max_length=48"],
    "codeact": ["selection.scorer.proxy_steps=4", "selection.scorer.max_length=48"],
    "less": ["selection.scorer.proxy_steps=4", "selection.scorer.warmup_epochs=2", "selection.scorer.max_length=48",
             "selection.scorer.proj_dim=32", "selection.scorer.max_target=4"],
    "perplexity_filter": ["selection.scorer.proxy_steps=4", "selection.scorer.max_length=48"],
    "regmix": ["stages.0.sweep.num_proxies=4"],
    # the law sweeps at 3 steps: an evaluation per step for cmr_law's fits, a budget the members reach, a tolerance
    # any 3-step change meets; fewer candidates for merge_ablation (the laws themselves: tests/test_*_law.py,
    # tests/test_merge_ablation.py)
    "cmr_law": ["train.eval_every=1", "stages.1.sweep.budget_steps=3", "stages.1.sweep.tolerance=10.0"],
    "merge_ablation": ["stages.1.sweep.grid_step=0.5", "+stages.1.sweep.eval_rows=2"],
    "conditional_training": ["dataset.control_tokens.scorer.proxy_steps=4", "dataset.control_tokens.scorer.max_length=48"],   # the sweep itself: tests/test_regmix.py
    # the test model has 2 decoder layers, not tiny_llama's 4
    "sorted_llama": ["objective.layers=[1,2]", "methods.export_depths.layers=[1,2]"],
    "sortednet": ["objective.layers=[1,2]", "methods.export_depths.layers=[1,2]"],
    # the teacher stage gets the test model's 2 layers too (a model.* override reaches every stage that sets it)
    "kd_torchdistill": ["stages.1.objective.hint.teacher_layer=2", "stages.1.objective.attention.pairs=[[1,1],[2,2]]",
                        "stages.1.objective.pkt.student_layer=2", "stages.1.objective.pkt.teacher_layer=2"],
    "s2l": ["selection.scorer.proxy_epochs=1", "selection.scorer.checkpoints=2", "selection.scorer.max_length=48"],
    "delt": ["curriculum.proxy_steps=10", "curriculum.ct_states=2", "curriculum.annotate_rows=32"],
    "difficulty_curriculum": ["curriculum.scorer.proxy_steps=4", "curriculum.scorer.max_length=48"],
    "quality_curriculum_avg": ["curriculum.scorer.proxy_steps=4", "curriculum.scorer.max_length=48"],
    # the synthesis stage rephrases a few documents briefly (the stage itself: tests/test_generation.py)
    "wrap_rephrase": ["stages.1.synthesis.max_documents=6", "stages.1.synthesis.generator.max_new_tokens=32"],
    "entigraph": ["stages.1.synthesis.max_documents=2", "stages.1.synthesis.generator.max_new_tokens=16"],
    "iterative_resampling": [f"stages.{i}.synthesis.{k}" for i in (1, 3)
                             for k in ("max_documents=4", "generator.max_new_tokens=16", "generator.n=2")],
    # min_words=1: a 2-step base writes noise, and at 16 tokens a class may get no candidate of 5 words (CI saw
    # arithmetic_aug empty once; the finetune stage's mixture then refuses, rightly, in one line)
    "peft_augmentation": ["stages.1.dataset.max_docs_per_domain=10", "stages.1.synthesis.rollout.per_example=1",
                          "stages.1.synthesis.generator.max_new_tokens=16", "stages.1.synthesis.rollout.min_words=1"],
    "struct_tuning": [f"stages.{i}.synthesis.{k}" for i in (1, 2)
                      for k in ("max_documents=2", "generator.max_new_tokens=16")],
}


@pytest.mark.parametrize("name", group_options("recipe"))
def test_recipe_runs_a_few_steps(name, tmp_path, train_in_process):
    meta = yaml.safe_load((config_root() / "recipe" / f"{name}.yaml").read_text())["recipe"]
    assert meta["name"] == name and meta["paper"] and meta["claim"] and "arxiv" in meta  # null for a baseline
    if "fp8_gpu" in meta.get("requires", []) and not _fp8_gpu():
        # where the device cannot run the recipe, it is refused before anything is built or any folder is made
        with pytest.raises(ConfigError, match="fp8_needs_sm89"):
            train_in_process([f"+recipe={name}", "train.max_steps=3"], tmp_path / "run")
        assert not (tmp_path / "run").exists()
        return
    if "cuda" in meta.get("requires", []) and not _cuda():
        with pytest.raises(ConfigError, match="qlora_needs_cuda"):  # bitsandbytes' 4-bit kernels: CUDA only
            train_in_process([f"+recipe={name}", "train.max_steps=3"], tmp_path / "run")
        assert not (tmp_path / "run").exists()
        return
    summary = train_in_process([f"+recipe={name}", "train.max_steps=3", *SMALL_PREPARATION.get(name, [])],
                               tmp_path / "run")
    assert summary["finished"] and summary["recipe"] == [name]
    assert math.isfinite(summary["final_eval_loss"])
    for run in summary.get("stages") or [summary]:  # a multi-stage recipe: every stage ran its 3 steps
        if run.get("dataset"):  # a synthesis stage trains nothing: it made a dataset
            assert run["finished"] and run["steps"] == 0 and os.path.getsize(run["dataset"]) > 0
            continue
        assert run["finished"] and run["steps"] == 3
        assert 0 < run["trainable_params"] <= run["total_params"]
