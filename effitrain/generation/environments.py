"""Environments of multi-turn rollouts (the ``environment`` registry group; schemas in
:mod:`effitrain.config.blocks.environment`).

The contract: ``reply(response, reference, turn) -> str``, the user message that follows the policy's ``response``
(decoded, special tokens dropped) at ``turn`` (1 for the first answer) of a conversation whose reference answer is
``reference``.  An environment is deterministic in its inputs, so a resumed run rebuilds the same conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from effitrain.objectives.rewards import EXTRACTORS, same_answer


@dataclass(frozen=True)
class ScriptedUser:
    """The same instruction after every turn (SCoRe's fixed self-correction prompt)."""
    message: str

    def reply(self, response: str, reference: str, turn: int) -> str:
        return self.message


@dataclass(frozen=True)
class Verifier:
    """Right or wrong, by the exact-answer check of the response against the reference."""
    extract: str
    right: str
    wrong: str

    def is_right(self, response: str, reference: str) -> bool:
        read = EXTRACTORS[self.extract]
        return same_answer(read(response), read(reference))

    def reply(self, response: str, reference: str, turn: int) -> str:
        return self.right if self.is_right(response, reference) else self.wrong


def build_scripted_user(params: Any, **context: Any) -> ScriptedUser:
    return ScriptedUser(params.message)


def build_verifier(params: Any, **context: Any) -> Verifier:
    return Verifier(params.extract, params.right, params.wrong)
