"""Rules of the model block's GPU kernel switches (torch-free): FlashAttention-2 and Liger's fused kernels are
refused where they cannot run, before anything is built, instead of failing inside the first forward."""

from __future__ import annotations

import importlib.util

from effitrain.config.rules import rule


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@rule("flash_attention_needs_cuda", "model.attn_implementation=flash_attention_2 needs flash-attn, a CUDA GPU and "
                                    "bf16/fp16 weights")
def _flash_attention(spec, env):
    if getattr(spec.block("model").params, "attn_implementation", None) != "flash_attention_2":
        return None
    if not installed("flash_attn"):
        return ("model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not installed; "
                "use model.attn_implementation=sdpa (PyTorch's fused attention)")
    if env.device_type is not None and env.device_type != "cuda":
        return (f"model.attn_implementation=flash_attention_2 needs a CUDA GPU, this is a {env.device_type} device; "
                f"use model.attn_implementation=sdpa")
    if spec.block("precision").name == "fp32":
        return ("model.attn_implementation=flash_attention_2 computes in bf16/fp16 only; use precision=bf16 "
                "(or model.attn_implementation=sdpa)")
    return None


@rule("liger_needs_cuda", "model.liger_kernels=true needs liger-kernel (Triton), a CUDA GPU, a model type Liger "
                          "supports and objective=causal_lm (no logits in training)")
def _liger(spec, env):
    if not getattr(spec.block("model").params, "liger_kernels", False):
        return None
    if not installed("liger_kernel"):
        return ("model.liger_kernels=true needs the liger-kernel package, which is not installed "
                "(pip install 'effitrain[gpu]'); set model.liger_kernels=false")
    objective = spec.blocks.get("objective")
    if objective is not None and objective.name != "causal_lm":
        # liger's lce_forward skips the logits whenever the model trains with labels (liger_kernel/transformers/
        # model/llama.py: skip_logits = self.training and labels is not None); only the model's own loss survives
        return (f"model.liger_kernels=true: Liger's fused linear cross-entropy returns no logits from a training "
                f"forward, and objective '{objective.name}' reads them; use objective=causal_lm or set "
                f"model.liger_kernels=false")
    if getattr(spec.block("model").params, "arch", None) == "gpt_neox":
        return "model.liger_kernels=true: liger-kernel has no kernels for gpt_neox; set model.liger_kernels=false"
    if env.device_type is not None and env.device_type != "cuda":
        return (f"model.liger_kernels=true needs a CUDA GPU (Liger's kernels are Triton), this is a "
                f"{env.device_type} device; set model.liger_kernels=false")
    return None
