"""Recipe values that issue 22's audit found contradicted by the authors' released code, pinned to the authors'.

Each row names where the value comes from; the recipe's card states it in its "paper vs this recipe" table.
Composition only (torch-free): the resolved config a run of the recipe gets.
"""

from __future__ import annotations

import pytest

from effitrain.config.lock import composed_recipe

AUTHORS = [
    # format_length_grpo: insightLLM/rl-without-gt rl/verl/verl/scripts/train/run_grpo_math_7b.sh and verl's defaults
    ("format_length_grpo", "stages.1.objective.temperature", 0.6),
    ("format_length_grpo", "stages.1.objective.beta", 0.001),
    ("format_length_grpo", "stages.1.objective.loss_type", "bnpo"),
    ("format_length_grpo", "stages.1.objective.entropy_coef", 0.001),
    ("format_length_grpo", "stages.2.objective.temperature", 0.6),
    ("format_length_grpo", "stages.2.objective.beta", 0.001),
    ("format_length_grpo", "stages.2.objective.reference", "@stage:sft"),
    ("format_length_grpo", "stages.2.objective.entropy_coef", 0.001),
    # qlora: artidoro/qlora runs --lr_scheduler_type constant, which transformers 4.31 runs without warm-up
    ("qlora", "scheduler.warmup_steps", 0),
    # tulu3: open-instruct's RLVR (GSM8K last-number verifier, non_stop_penalty -10, num_epochs 4)
    ("tulu3", "stages.2.objective.rewards.0.extract", "last_number"),
    ("tulu3", "stages.2.objective.no_eos_reward", -10.0),
    ("tulu3", "stages.2.objective.iterations", 4),
    # g_stack: tongxuluo/prts g_stack.sh --resume_id 5000 continues the data stream; the small model grows at peak LR
    ("g_stack", "stages.1.data", "continue"),
    ("g_stack", "stages.0.scheduler.min_lr_ratio", 1.0),
    # structured_ffn: the authors' first_layer: true (every config) and per-batch guide draws
    ("structured_ffn", "peft.first_layer_dense", True),
    ("structured_ffn", "methods.self_guided.draw_every", "micro_batch"),
    # quality_curriculum_avg: the paper's EMA "decay 0.2" in the reading its card states (the newest snapshot 0.8)
    ("quality_curriculum_avg", "methods.checkpoint_average.alpha", 0.8),
    # moe_upcycle: AquilaMoE's router losses
    ("moe_upcycle", "stages.1.transform.aux_loss_coef", 0.001),
    ("moe_upcycle", "stages.1.transform.z_loss_coef", 0.01),
    # thinkless: VainF/Thinkless scripts/rl/thinkless_1.5b_deepscaler.sh, its verl config and reward_types.py
    ("thinkless", "stages.1.objective.decoupled_alpha", 0.001),
    ("thinkless", "stages.1.objective.scale_rewards", "none"),
    ("thinkless", "stages.1.objective.temperature", 0.6),
    ("thinkless", "stages.1.objective.beta", 0.001),
    ("thinkless", "stages.1.objective.group_size", 8),
    ("thinkless", "stages.1.objective.entropy_coef", 0.001),
    ("thinkless", "stages.1.objective.rewards.0.name", "thinkless"),
]


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("recipe, key, value", AUTHORS, ids=[f"{r}:{k}" for r, k, _ in AUTHORS])
def test_the_recipe_runs_the_authors_value(recipe, key, value):
    assert _get(composed_recipe(recipe).cfg, key) == value
