"""Generation-based evaluation (``methods: {answer_accuracy: {...}}``): greedy answers to the held-out built-in
arithmetic questions, exact-match accuracy logged with the eval loss (effitrain.methods.answer_accuracy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("method", "answer_accuracy", builder="effitrain.methods.answer_accuracy:build_answer_accuracy",
          summary="At each eval: greedy answers to held-out checkable arithmetic, exact-match eval_accuracy")
@dataclass
class AnswerAccuracyParams:
    examples: int = param(64, ge=1, help="held-out questions answered (the chat_demo eval split's first ones)")
    max_new_tokens: int = param(8, ge=1, help="tokens generated at most per answer")
    batch_size: int = param(32, ge=1, help="questions per generate call")
    extract: Literal["full", "boxed", "last_number"] = param(
        "full", help="full: the whole answer is the number; boxed: the last \\boxed{...}; last_number: the last "
                     "number in the answer")
    control_tokens: list[str] = param(
        default_factory=list, help="log eval_share_NAME, the share of answers that begin with each of these tokens "
                                   "(NAME: the token without <>; Thinkless: [<short>, <think>])")


@rule("answer_accuracy_needs_chat_demo", "methods.answer_accuracy asks the built-in arithmetic questions: it needs "
                                         "dataset=chat_demo and whole parameters (ZeRO <= 2)")
def _answer_accuracy(spec, env) -> Optional[str]:
    if not any(b.name == "answer_accuracy" for b in spec.methods.values()):
        return None
    if spec.block("dataset").name != "chat_demo":
        # it knows each held-out question's number, which only the generated arithmetic data has: your own data's
        # answers are free text, so there is no exact match to score (the eval loss still measures the fit)
        return (f"methods.answer_accuracy asks the built-in arithmetic questions, which dataset="
                f"{spec.block('dataset').name} does not have; switch it off with '~methods.answer_accuracy' (where a "
                f"stage sets it: '~stages.N.methods.answer_accuracy'; the eval loss on your held-out conversations "
                f"remains), or use dataset=chat_demo")
    if spec.block("parallelism").params.stage == 3:
        return "methods.answer_accuracy generates with whole parameters, which ZeRO-3 partitions; use parallelism=zero2"
    return None
