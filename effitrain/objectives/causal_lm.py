"""``objective: causal_lm``: the model's own next-token loss, exactly what the loop computed before objectives."""

from __future__ import annotations

from typing import Any

from effitrain.objectives.common import model_inputs


class CausalLM:
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[Any, dict[str, Any]]:
        return model(**model_inputs(batch)).loss, {}


def build(params: Any, **context: Any) -> CausalLM:
    return CausalLM()
