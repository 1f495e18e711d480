"""The ``environment`` block: what answers between a policy's turns in a multi-turn GRPO rollout
(``objective.grpo.turns`` > 1, ``objective.grpo.environment: {name: ...}``).

After turn t the environment reads the policy's response (and the prompt's reference answer) and writes the next
user message; the policy then answers again in the same conversation.  Its message is rendered with the chat
template as a user turn followed by the assistant header (:func:`effitrain.data.chat.follow_up_ids`) and is never
trained on (its tokens carry no loss).

* ``scripted_user``: a fixed instruction after every turn, whatever the response -- SCoRe's self-correction prompt
  (Kumar et al., 2409.12917, its MATH instruction) by default;
* ``verifier``: says whether the response's answer equals the reference (the ``exact_answer`` check, with its
  ``extract``), with one message for right and one for wrong (an oracle verifier: Reflexion-style feedback).

Torch-free here; the environments are in :mod:`effitrain.generation.environments`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from effitrain.registry import ConfigError, param, register

#: SCoRe's self-correction instruction for MATH (2409.12917, section 6 / appendix: the second-attempt prompt)
SCORE_INSTRUCTION = ("There might be an error in the solution above because of lack of understanding of the "
                     "question. Please correct the error, if any, and rewrite the solution.")


def _not_blank(value: str, path: str) -> None:
    if not value.strip():
        raise ConfigError(f"{path}: empty; the environment's message must say something (the policy answers it)")


@register("environment", "scripted_user", builder="effitrain.generation.environments:build_scripted_user",
          summary="a fixed user message after every policy turn (SCoRe's 'There might be an error ... please "
                  "correct it' by default)")
@dataclass
class ScriptedUserParams:
    message: str = param(SCORE_INSTRUCTION, help="the user message sent after each of the policy's turns")

    def validate(self, path: str) -> None:
        _not_blank(self.message, f"{path}.message")


@register("environment", "verifier", builder="effitrain.generation.environments:build_verifier",
          summary="tells the policy whether its answer equals the reference answer (the exact_answer check)")
@dataclass
class VerifierParams:
    extract: Literal["full", "boxed", "last_number"] = param(
        "full", help="how the answer is read from the response and the reference (as exact_answer's extract)")
    right: str = param("Your answer is correct.", help="the message after a right answer")
    wrong: str = param("Your answer is incorrect. Please correct it.", help="the message after a wrong answer")

    def validate(self, path: str) -> None:
        _not_blank(self.right, f"{path}.right")
        _not_blank(self.wrong, f"{path}.wrong")
