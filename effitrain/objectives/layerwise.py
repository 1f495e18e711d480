"""``objective: layerwise``: the model's shared final norm and LM head on the outputs of chosen decoder layers.

    loss = sum_k w_k l_k / sum_k w_k,   l_k = next-token loss of head(norm(hidden_states[k]))

As in Sorted LLaMA / SoFT (Kavehzadeh et al., 2309.08968): the sub-model of the first k layers shares the full
model's output head, and the sub-models' cross-entropies are summed.  The public ``SoFTModel`` we read (a
DeepSpeed-Chat-based module found with the search tool; its repository could not be identified, so it is not
certainly the authors') runs the model with ``output_hidden_states=True`` and decodes ``hidden_states[k]`` with the
model's own ``lm_head(model.norm(.))`` - the final norm shared too, no new parameters - adding each layer's loss to
the full model's loss with weight 1.  Here the weights are configurable (default all 1) and the sum is normalised by
their total, so the loss stays on the scale of one cross-entropy.

Layer ``k`` counts decoder layers from 1: ``hidden_states[k]`` is the output of layer k.  In transformers the last
entry, ``hidden_states[L]``, already went through the final norm, so for ``k = L`` the model's own logits and loss are
used (that code would apply the norm a second time there); the last layer alone therefore gives exactly the
``causal_lm`` loss.  The norm and head are called as modules of the engine's model, so ZeRO-3 gathers them.
"""

from __future__ import annotations

from typing import Any

import torch

from effitrain.objectives.common import mean_token_loss, model_inputs
from effitrain.registry import ConfigError

# Where the final norm lives on the base (decoder) model of the transformers families: Llama, Qwen2, Mistral,
# Gemma ... (norm), GPT-NeoX (final_layer_norm), GPT-2 (ln_f)
_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f")


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (``PeftModel.base_model.model``), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def final_norm(model: Any) -> torch.nn.Module:
    """The final norm applied before the LM head, found on the decoder/base model."""
    hf = unwrap(model)
    candidates = []
    get_decoder = getattr(hf, "get_decoder", None)
    if callable(get_decoder):
        candidates.append(get_decoder())
    candidates.append(getattr(hf, getattr(hf, "base_model_prefix", "model"), None))
    for base in candidates:
        for name in _NORM_NAMES:
            norm = getattr(base, name, None) if base is not None else None
            if isinstance(norm, torch.nn.Module):
                return norm
    raise ConfigError(f"objective=layerwise: cannot find the final norm of a '{hf.config.model_type}' model (looked "
                      f"for {', '.join(_NORM_NAMES)} on its base model); it works with Llama-style transformers models")


def output_head(model: Any) -> torch.nn.Module:
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    if head is None:
        raise ConfigError(f"objective=layerwise: a '{hf.config.model_type}' model has no output embeddings (LM head)")
    return head


class Layerwise:
    def __init__(self, layers: list[int], weights: list[float], num_layers: int, norm: torch.nn.Module,
                 head: torch.nn.Module) -> None:
        self.layers, self.weights, self.num_layers = layers, weights, num_layers
        self.norm, self.head = norm, head
        self.total_weight = float(sum(weights))

    def layer_logits(self, out: Any, k: int) -> torch.Tensor:
        if k == self.num_layers:  # already normed by the model: its own logits
            return out.logits
        return self.head(self.norm(out.hidden_states[k]))

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**model_inputs(batch), output_hidden_states=True)
        loss = torch.zeros((), device=out.logits.device)
        metrics = {}
        for k, w in zip(self.layers, self.weights):
            if k == self.num_layers and out.loss is not None:
                layer_loss = out.loss  # exactly the causal_lm loss
            else:
                layer_loss = mean_token_loss(self.layer_logits(out, k), batch["labels"])
            loss = loss + w * layer_loss
            metrics[f"layer_loss/{k}"] = layer_loss.detach()
        return loss / self.total_weight, metrics


def build(params: Any, *, model: Any, **context: Any) -> Layerwise:
    hf = unwrap(model)
    num_layers = int(hf.config.num_hidden_layers)
    for i, k in enumerate(params.layers):
        if k > num_layers:
            raise ConfigError(f"objective.layers[{i}]: layer {k} is out of range; the model has {num_layers} decoder "
                              f"layers (1..{num_layers})")
    weights = params.weights if params.weights is not None else [1.0] * len(params.layers)
    return Layerwise(list(params.layers), list(weights), num_layers, final_norm(model), output_head(model))
