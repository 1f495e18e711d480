"""``objective: sami``: principle-following without preferences (SAMI, Fränken et al., 2404.14313): responses
sampled under each of C constitutions, and the contrastive (InfoNCE) loss of the C x C matrix of their
length-normalised log-probabilities under every constitution (:mod:`effitrain.objectives.sami`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register

# the objective module's defaults, written here too: schemas import no torch (effitrain check answers in < 1 s)
DEFAULT_CONSTITUTIONS = ("Answer with the number only.", "Answer in a full sentence.")


@register("objective", "sami", builder="effitrain.objectives.sami:build",
          summary="SAMI: responses sampled under C constitutions, InfoNCE over the C x C matrix of their "
                  "log-probabilities under every constitution (Fränken et al., 2404.14313)")
@dataclass
class SAMIParams:
    constitutions: list[str] = param(
        default_factory=lambda: list(DEFAULT_CONSTITUTIONS),
        help="the principles (C >= 2), each given as a system message before the prompt; the built-in two "
             "('Answer with the number only.', 'Answer in a full sentence.') are checked, so the share of "
             "responses that follow their own constitution is logged (sami_follow)")
    sample_from: Literal["stage_start", "policy"] = param(
        "stage_start", help="stage_start: a frozen copy of the model at the stage's start samples (the paper's "
                            "iterations: chain stages with init: previous for the next one); policy: the model "
                            "being trained samples (on-policy)")
    max_new_tokens: int = param(16, ge=1, help="response tokens at most")
    temperature: float = param(1.0, gt=0, help="sampling temperature (the log-probabilities in the loss are the "
                                               "model's own, at temperature 1)")
    seed: int = param(0, help="sampling seed; a micro-batch's samples depend on (seed, micro-step, rank) only, so "
                              "a resumed run draws the same responses")

    def validate(self, path: str) -> None:
        if len(self.constitutions) < 2:
            raise ConfigError(f"{path}.constitutions: {len(self.constitutions)} given; the contrast needs at least "
                              f"two principles, e.g. {list(DEFAULT_CONSTITUTIONS)}")
        if any(not c.strip() for c in self.constitutions):
            raise ConfigError(f"{path}.constitutions: an empty constitution; write each principle as text")
        if len(set(self.constitutions)) != len(self.constitutions):
            raise ConfigError(f"{path}.constitutions: a constitution is given twice; the matrix needs distinct "
                              f"principles")

    def step_description(self, rows: int, seq_len: int) -> str:
        c = len(self.constitutions)
        return (f"{rows} prompts per step, each answered once under each of {c} constitutions: {rows * c} sampled "
                f"responses of up to {self.max_new_tokens} new tokens, each scored under all {c} constitutions "
                f"({rows * c * c} sequences); the tokens column counts {seq_len} per prompt, as the run's log does")


@rule("sami_needs_whole_parameters", "objective sami samples with model.generate, which needs whole parameters: "
                                     "ZeRO <= 2")
def _sami_whole_parameters(spec, env) -> Optional[str]:
    if spec.block("objective").name != "sami":
        return None
    if spec.block("parallelism").params.stage == 3:
        return ("objective=sami samples responses with whole parameters, which ZeRO-3 partitions; use "
                "parallelism=zero2")
    return None
