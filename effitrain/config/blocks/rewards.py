"""Reward blocks (the ``reward`` group): the verifiable rewards that ``objective: grpo`` sums, e.g.
``objective.rewards: [{name: exact_answer}, {name: format, weight: 1.0}]`` (effitrain.objectives.rewards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from effitrain.config.rules import rule
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


@register("reward", "thinkless", builder="effitrain.objectives.rewards:build_thinkless",
          summary="Thinkless's mode-aware reward: right and short 1.0 > right after <think> 0.5 > wrong or malformed "
                  "-1.0 (Fang et al., 2505.13379)")
@dataclass
class ThinklessParams(_Weighted):
    #: compares with the prompt's reference answer
    reads_reference: ClassVar[bool] = True
    correct_short: float = param(1.0, help="a right answer after <short> (the authors' correct_short_reward: 1.0)")
    correct_think: float = param(0.5, help="a right answer after <think>...</think> (the authors': 0.5)")
    wrong_short: float = param(-1.0, help="a wrong answer after <short> (the authors': -1.0)")
    wrong_think: float = param(-1.0, help="a wrong answer after <think>...</think> (the authors': -1.0)")
    format_error: float = param(-1.0, help="no <short> or <think>...</think>, or no \\boxed{} answer after it (the "
                                           "authors' format_error_reward: -1.0)")

    def validate(self, path: str) -> None:
        # the method's point: a right short answer is worth at least a right long one (equal: the ablation without
        # a preference for short), and any right answer more than a wrong one
        if not self.correct_short >= self.correct_think > max(self.wrong_short, self.wrong_think):
            raise ConfigError(f"{path}: needs correct_short >= correct_think > wrong_short, wrong_think (got "
                              f"{self.correct_short}, {self.correct_think}, {self.wrong_short}, {self.wrong_think}); "
                              f"the authors' 1.0, 0.5, -1.0, -1.0")


@rule("thinkless_needs_control_tokens", "the thinkless reward and objective.grpo.decoupled_alpha read the control "
                                        "token an answer begins with: on chat_demo they need answer_style=thinkless")
def _thinkless_needs_control_tokens(spec, env) -> Optional[str]:
    objective = spec.block("objective")
    if objective.name != "grpo":
        return None
    uses = [f"the {b.name} reward" for b in objective.params.reward_blocks if b.name == "thinkless"]
    if objective.params.decoupled_alpha is not None:
        uses.append("objective.grpo.decoupled_alpha")
    dataset = spec.block("dataset")
    if not uses or dataset.name != "chat_demo" or dataset.params.answer_style == "thinkless":
        return None
    # other data: the user's answers carry their own control tokens, which their tokenizer must hold
    return (f"{' and '.join(uses)} read the control token (<short> / <think>) an answer begins with, but "
            f"dataset.answer_style={dataset.params.answer_style} teaches none and adds none to the tokenizer; set "
            f"dataset.answer_style=thinkless (SFT warm-up pairs with both tokens)")
