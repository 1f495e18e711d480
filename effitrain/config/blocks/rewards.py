"""Reward blocks (the ``reward`` group): the verifiable rewards that ``objective: grpo`` sums, e.g.
``objective.rewards: [{name: exact_answer}, {name: format, weight: 1.0}]`` (effitrain.objectives.rewards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from effitrain.registry import ConfigError, param, register

Extract = Literal["full", "boxed", "last_number"]


@dataclass
class _Weighted:
    weight: float = param(1.0, help="this reward's weight in the sum the advantages are computed from")


@register("reward", "exact_answer", builder="effitrain.objectives.rewards:build_exact_answer",
          summary="`correct` when the response's answer equals the reference answer, else 0 (Tülu 3's RLVR reward)")
@dataclass
class ExactAnswerParams(_Weighted):
    #: compares with the prompt's reference answer, so a prompt without one can never be rewarded
    reads_reference: ClassVar[bool] = True
    extract: Extract = param("full", help="full: the whole response; boxed: the last \\boxed{...}; last_number: the "
                                          "last number in the text (the reference is read the same way)")
    correct: float = param(1.0, gt=0, help="the reward of a right answer (DeepSeekMath: 1; Tülu 3's RLVR: 10)")


@register("reward", "format", builder="effitrain.objectives.rewards:build_format",
          summary="Surrogate format reward: mean of <think>...</think> present and a well-formed \\boxed{} answer "
                  "(Xin et al., 2505.19439)")
@dataclass
class FormatParams(_Weighted):
    think: bool = param(True, help="check that the response contains <think>...</think>")
    answer: bool = param(True, help="check that a \\boxed{} answer is present and is a number or expression")
    zero_without_answer: bool = param(False, help="0 when the answer check fails (the authors' format-length score)")

    def validate(self, path: str) -> None:
        if not (self.think or self.answer):
            raise ConfigError(f"{path}: think and answer are both false, so the format reward checks nothing; "
                              f"enable at least one")
        if self.zero_without_answer and not self.answer:
            raise ConfigError(f"{path}.zero_without_answer: needs {path}.answer=true")


@register("reward", "length", builder="effitrain.objectives.rewards:build_length",
          summary="Surrogate length reward: rises to 1 at peak x max_tokens, falls to -1 at max_tokens "
                  "(Xin et al., 2505.19439)")
@dataclass
class LengthParams(_Weighted):
    max_tokens: int = param(3072, ge=1, help="the length (completion tokens) where the reward reaches -1 (authors: "
                                             "3072)")
    peak: float = param(0.5, gt=0, lt=1, help="the reward is 1 at peak x max_tokens (authors: 0.5)")
    gated: bool = param(True, help="without a well-formed \\boxed{} answer the reward is min(0, length), as the "
                                   "authors' format-length score")
