"""``objective: causal_lm``: the model's own next-token loss, exactly what the loop computed before objectives."""

from __future__ import annotations

from typing import Any

from effitrain.objectives.common import model_inputs, router_z_loss, shifted_token_loss_sum
from effitrain.parallel.ulysses import SHIFT_LABELS


class CausalLM:
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[Any, dict[str, Any]]:
        sequence_parallel = getattr(state, "sequence_parallel", None)
        if sequence_parallel is not None:
            return self._sequence_parallel(model, sequence_parallel.shard(batch), sequence_parallel)
        out = model(**model_inputs(batch))
        # a mixture-of-experts model's loss already includes its router's load-balancing term (coefficient in its
        # config); it is logged on its own so the language-model part stays readable
        aux = getattr(out, "aux_loss", None)
        metrics = {"router_aux_loss": aux.detach()} if aux is not None else {}
        loss = out.loss
        z_coef = _z_loss_coef(model)
        if z_coef and getattr(out, "router_logits", None):
            z_loss = router_z_loss(out.router_logits)
            loss = loss + z_coef * z_loss
            metrics["router_z_loss"] = z_loss.detach()
        return loss, metrics

    @staticmethod
    def _sequence_parallel(model: Any, shard: dict[str, Any], sp: Any) -> tuple[Any, dict[str, Any]]:
        """DeepSpeed-Ulysses (effitrain.parallel.ulysses): this process holds a slice of every sequence; the loss
        is the mean over the whole sequences, the slices' sums over the group's token count."""
        labels = shard.pop(SHIFT_LABELS)
        out = model(**model_inputs(shard))
        loss_sum, count = shifted_token_loss_sum(out.logits, labels)
        loss = sp.mean(loss_sum, count)
        aux = getattr(out, "aux_loss", None)
        if aux is None:
            return loss, {}
        # each slice's router sees only its tokens: the group's mean of the slices' balancing terms
        aux = sp.mean(aux * count, count)
        return loss + model.config.router_aux_loss_coef * aux, {"router_aux_loss": aux.detach()}


def _z_loss_coef(model: Any) -> float:
    """The router z-loss weight an upcycled MoE model carries in its config (``router_z_loss_coef``; 0 when absent:
    a stock model's loss is its own)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return float(getattr(config, "router_z_loss_coef", 0.0) or 0.0)


def build(params: Any, **context: Any) -> CausalLM:
    return CausalLM()
