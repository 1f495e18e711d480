"""The evaluation tasks that ship with effitrain (``effitrain/eval_tasks/``, offline) and the check of the task
names an ``eval`` block asks for: what the eval schema's ``check_inputs`` needs before anything is built, below
:mod:`effitrain.evaluation`, which runs the harness on a trained model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from effitrain.registry import ConfigError, did_you_mean

TASKS_DIR = Path(__file__).resolve().parents[1] / "eval_tasks"


def make_demo_arithmetic(n: int = 200) -> list[dict[str, Any]]:
    """The ``demo_arithmetic`` items: one-digit sums and differences in the demo corpus's worksheet format, the
    right answer among three near misses (``eval_tasks/demo_arithmetic.jsonl`` is this, written once)."""
    rng = random.Random("effitrain-demo-arithmetic-task")
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        wrong: set[int] = set()
        while len(wrong) < 3:
            w = value + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
            if w != value:
                wrong.add(w)
        choices = [value, *sorted(wrong)]
        rng.shuffle(choices)
        rows.append({"context": f"Worksheet: 1-digit arithmetic\n{a} {op} {b} =",
                     "choices": [f" {c}" for c in choices], "label": choices.index(value)})
    return rows


def local_tasks() -> dict[str, dict[str, Any]]:
    """Task configs (the harness's YAML schema, as dicts) of the tasks that ship with effitrain."""
    return {
        "demo_arithmetic": {
            "task": "demo_arithmetic",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(TASKS_DIR / "demo_arithmetic.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        },
    }


def check_tasks(params: Any) -> Any:
    """Refuse unknown task names (with the local ones and a did-you-mean); returns the harness's task manager."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("eval=lm_eval needs EleutherAI's harness: pip install 'lm-eval[hf]' "
                          "(it is in effitrain's [eval] extra)") from None
    if params.include_path and not Path(params.include_path).is_dir():
        raise ConfigError(f"eval.include_path: '{params.include_path}' is not a folder of task YAMLs")
    local = local_tasks()
    # Indexing the harness's own few thousand task files takes ~15 s on two cores: only when a task needs them.
    defaults = any(name not in local for name in params.tasks)
    manager = TaskManager(include_path=params.include_path, include_defaults=defaults)
    for name in params.tasks:
        if name not in local and name not in manager.all_tasks:
            raise ConfigError(f"eval.tasks: unknown task '{name}'{did_you_mean(name, [*local, *manager.all_tasks])}; "
                              f"effitrain's offline tasks: {', '.join(local)}; the harness lists its own with "
                              f"'lm-eval ls tasks'")
    return manager
