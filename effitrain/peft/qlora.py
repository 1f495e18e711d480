"""QLoRA (Dettmers et al. 2023, 2305.14314), as the authors' qlora.py builds it: the base loaded in 4-bit through
``BitsAndBytesConfig(load_in_4bit, bnb_4bit_quant_type=nf4, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=bf16)``,
``peft.prepare_model_for_kbit_training`` (gradient checkpointing, input gradients, the non-quantised weights in fp32),
then LoRA (r 64, alpha 16, dropout 0.1, bias none) on every linear layer but the LM head.

:func:`quantization_config` and :func:`lora_config` build the two configs without a GPU (tests check them there);
:func:`build_qlora` needs CUDA (the rule ``qlora_needs_cuda`` refuses the block elsewhere, before anything is built).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from effitrain.peft.wrap import wrap_model


def quantization_config(params: Any) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of the frozen base."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=params.quant_type,
                              bnb_4bit_use_double_quant=params.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, params.compute_dtype))


def lora_config(params: Any) -> Any:
    """The ``peft.LoraConfig`` of the adapters (``target_modules: [all-linear]`` is peft's own 'all-linear' rule:
    every ``nn.Linear``/``Linear4bit`` but the output layer, as the authors' ``find_all_linear_names``)."""
    import peft

    targets = list(params.target_modules)
    return peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=params.r, lora_alpha=params.alpha,
                           lora_dropout=params.dropout, bias="none",
                           target_modules="all-linear" if targets == ["all-linear"] else targets,
                           modules_to_save=list(params.modules_to_save) or None)


def quantize(model: Any, params: Any) -> Any:
    """The same weights reloaded in 4-bit on this process's GPU: ``save_pretrained`` to a temporary folder, then
    ``from_pretrained(quantization_config=...)``, the path the authors' loader takes (quantisation happens as the
    weights reach the GPU)."""
    from transformers import AutoModelForCausalLM

    device = torch.cuda.current_device()  # train.py has set it to this process's local rank
    with tempfile.TemporaryDirectory(prefix="effitrain-qlora-") as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config(params),
                                                    dtype=getattr(torch, params.compute_dtype),
                                                    device_map={"": device})


def build_qlora(params: Any, model: Any) -> Any:
    from peft import prepare_model_for_kbit_training

    if not torch.cuda.is_available():  # the rule refuses this first; a direct call gets the same reason
        from effitrain.registry import ConfigError
        raise ConfigError("peft=qlora: bitsandbytes' 4-bit weights need a CUDA GPU; use +recipe=lora on this machine")
    quantized = quantize(model, params)
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=params.gradient_checkpointing)
    return wrap_model(quantized, lora_config(params))
