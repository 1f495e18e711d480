"""``objective: causal_lm``: the model's own next-token loss, exactly what the loop computed before objectives."""

from __future__ import annotations

from typing import Any

from effitrain.objectives.common import model_inputs


class CausalLM:
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[Any, dict[str, Any]]:
        out = model(**model_inputs(batch))
        # a mixture-of-experts model's loss already includes its router's load-balancing term (coefficient in its
        # config); it is logged on its own so the language-model part stays readable
        aux = getattr(out, "aux_loss", None)
        return out.loss, ({"router_aux_loss": aux.detach()} if aux is not None else {})


def build(params: Any, **context: Any) -> CausalLM:
    return CausalLM()
