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

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from effitrain.models.transforms import decoder_layers
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
                 head: torch.nn.Module, sample: str = "all", seed: int = 0, draw_every: str = "micro_batch") -> None:
        self.layers, self.weights, self.num_layers = layers, weights, num_layers
        self.norm, self.head = norm, head
        self.total_weight = float(sum(weights))
        self.sample, self.seed, self.draw_every = sample, seed, draw_every
        self.params_above: dict[int, int] = {}   # sample=one: parameters of the layers above each depth

    def layer_logits(self, out: Any, k: int) -> torch.Tensor:
        if k == self.num_layers:  # already normed by the model: its own logits
            return out.logits
        return self.head(self.norm(out.hidden_states[k]))

    def depth_of(self, draw: int) -> int:
        """sample=one: the depth of draw number ``draw`` (weighted by ``weights``), a function of (seed, draw) only,
        so the same on every rank and after a resume."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        probs = torch.tensor(self.weights, dtype=torch.float64) / self.total_weight
        return self.layers[int(torch.multinomial(probs, 1, generator=generator))]

    def draw_index(self, state: Any) -> int:
        """Which draw a forward pass uses: its micro-batch's number (the authors' SortedNet loop samples a sub-model
        for every batch it backpropagates, so with gradient accumulation one optimizer step sums the gradients of
        several sub-models), or the optimizer step's (``draw_every: step``: one depth for all its micro-batches).
        All ranks share the draw: each rank's micro-batch number is the same, so every process runs the same layers
        and the ZeRO gradient reduction sees the same parameters on all of them."""
        return state.micro_step if self.draw_every == "micro_batch" else state.step

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.sample == "one":
            k = self.depth_of(self.draw_index(state))
            with truncated_depth(model, k):     # the sub-model alone: layers above k neither run nor get gradients
                out = model(**model_inputs(batch))
            return out.loss, {"sampled_depth": torch.tensor(float(k), device=out.loss.device)}
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

    @torch.no_grad()
    def eval_losses(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The next-token loss of every listed depth's sub-model on an eval batch (``eval_loss_depth/K``)."""
        out = model(**model_inputs(batch), output_hidden_states=True)
        return {f"eval_loss_depth/{k}": mean_token_loss(self.layer_logits(out, k), batch["labels"])
                for k in self.layers}

    def extra_flops(self, state: Any) -> float:
        """What the 6N count misses.  sample=all: the shared head (and final norm) run once more, forward and
        backward, for every listed depth below the last: 6 x their parameters per token each.  sample=one: the 6N
        count charges every layer each step; a step at depth k skips the layers above it."""
        if not state.step:
            return 0.0
        if self.sample == "all":
            extra_depths = sum(1 for k in self.layers if k != self.num_layers)
            head = sum(p.numel() for p in self.head.parameters()) + sum(p.numel() for p in self.norm.parameters())
            return 6.0 * head * extra_depths * state.tokens
        if not self.params_above:
            _, layers = decoder_layers(unwrap(state.model))
            sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
            self.params_above = {k: sum(sizes[k:]) for k in self.layers}
        draws = state.micro_step if self.draw_every == "micro_batch" else state.step
        tokens_per_draw = state.tokens / draws
        skipped = sum(self.params_above[self.depth_of(d)] for d in range(draws))
        return -6.0 * skipped * tokens_per_draw


@contextmanager
def truncated_depth(model: Any, depth: int) -> Iterator[None]:
    """Run ``model`` as its sub-model of the first ``depth`` decoder layers (the final norm and head unchanged):
    the layer list is cut for the duration of the forward (transformers iterates ``layers[:num_hidden_layers]``)."""
    hf = unwrap(getattr(model, "module", model))     # the DeepSpeed engine's transformers model
    _, layers = decoder_layers(hf)
    parent = hf.get_decoder() if callable(getattr(hf, "get_decoder", None)) else hf.model
    full = parent.layers
    if full is not layers:
        raise ConfigError("objective.sample=one: cannot find the decoder's layer list to cut")
    parent.layers = torch.nn.ModuleList(list(full)[:depth])
    try:
        yield
    finally:
        parent.layers = full


def build(params: Any, *, model: Any, **context: Any) -> Layerwise:
    hf = unwrap(model)
    num_layers = int(hf.config.num_hidden_layers)
    for i, k in enumerate(params.layers):
        if k > num_layers:
            raise ConfigError(f"objective.layers[{i}]: layer {k} is out of range; the model has {num_layers} decoder "
                              f"layers (1..{num_layers})")
    weights = params.weights if params.weights is not None else [1.0] * len(params.layers)
    return Layerwise(list(params.layers), list(weights), num_layers, final_norm(model), output_head(model),
                     sample=params.sample, seed=params.seed, draw_every=params.draw_every)
