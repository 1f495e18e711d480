"""Switches of the model block applied after a model is built, by every model builder: activation checkpointing
and Liger's fused kernels.  (The attention kernel is chosen earlier, through transformers' ``attn_implementation``.)
"""

from __future__ import annotations

from typing import Any

from effitrain.registry import ConfigError


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.  Non-reentrant
    ``torch.utils.checkpoint`` (``use_reentrant=False``): it works when the layer inputs do not require grad (frozen
    embeddings under LoRA) and with DeepSpeed's ZeRO hooks, and is what PyTorch recommends."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_liger_kernels(model: Any) -> None:
    """Liger's Triton kernels on this model instance: RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy
    (liger_kernel ``MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](model=model)`` with its defaults).

    The fused linear cross-entropy computes the loss chunk by chunk from the last hidden state and the output
    weight, so in training (``model.training`` and labels given) the model returns ``logits=None``: the loss is the
    same mean token cross-entropy, but nothing downstream may read the logits of a training forward.  Liger's RoPE
    patch replaces the function in transformers' modeling module, so it applies to every model of that family in
    the process."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"model.liger_kernels: liger-kernel has no kernels for model type '{model_type}'; "
                          f"set model.liger_kernels=false")
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](model=model)


def apply_model_switches(model: Any, params: Any) -> Any:
    if getattr(params, "liger_kernels", False):
        apply_liger_kernels(model)
    if getattr(params, "gradient_checkpointing", False):
        enable_activation_checkpointing(model)
    return model
