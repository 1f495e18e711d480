"""Evaluation block: task evaluations of the final model with EleutherAI's lm-evaluation-harness.

``eval=lm_eval`` runs ``eval.tasks`` on ``final_model/`` when training finishes (results in ``summary.json`` under
``tasks``); ``effitrain evaluate PATH`` runs them on any model folder, checkpoint or run directory.  Besides the
harness's own tasks (which need their datasets: network or a warm Hugging Face cache), effitrain ships local tasks
that work offline (``demo_arithmetic``).  Sample generations at evaluation time are a method: ``methods.samples``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("eval", "none", builder="effitrain.evaluation:build_none", summary="no task evaluation")
@dataclass
class NoEvalParams:
    pass


@register("eval", "lm_eval", builder="effitrain.evaluation:build_lm_eval",
          summary="lm-evaluation-harness tasks on the final model (local tasks ship with effitrain)")
@dataclass
class LmEvalParams:
    tasks: list[str] = field(default_factory=lambda: ["demo_arithmetic"])
    num_fewshot: Optional[int] = param(None, ge=0, help="null = each task's own default")
    limit: Optional[int] = param(None, ge=1, help="documents per task (null: all)")
    batch_size: int = param(8, ge=1)
    include_path: Optional[str] = param(None, help="a folder of your own task YAMLs, added to the harness's")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.eval_tasks import check_tasks

        check_tasks(self)


@rule("lm_eval_needs_final_model", "eval=lm_eval evaluates final_model/: train.save_final_model must be true")
def _eval_needs_final_model(spec, env) -> Optional[str]:
    if spec.blocks.get("eval") is not None and spec.block("eval").name == "lm_eval" \
            and not spec.train.save_final_model:
        return "eval=lm_eval evaluates the saved final model; set train.save_final_model=true (or eval=none)"
    return None
