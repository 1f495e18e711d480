"""Model block: a `transformers` causal LM from a preset architecture or from a name/path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.registry import ConfigError, param, register


@register("model", "llama", builder="effitrain.models.build:build_llama",
          summary="A Llama-architecture causal LM initialised from scratch (LlamaConfig)")
@dataclass
class LlamaParams:
    hidden_size: int = param(128, ge=8)
    num_layers: int = param(4, ge=1)
    num_heads: int = param(4, ge=1)
    num_kv_heads: Optional[int] = param(None, ge=1, help="grouped-query attention; null = num_heads")
    intermediate_size: int = param(352, ge=8)
    max_position_embeddings: int = param(2048, ge=16)
    rope_theta: float = param(10000.0, gt=0)
    tie_word_embeddings: bool = True
    tokenizer: str = param("bpe", help="'bpe' trains a byte-level BPE on the training split; else a HF name/path")
    vocab_size: int = param(4096, ge=260, help="vocabulary of the trained BPE (ignored for a named tokenizer)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = param(
        "sdpa", help="attention kernel: PyTorch SDPA, FlashAttention-2 (flash-attn, CUDA, bf16/fp16) or eager")
    gradient_checkpointing: bool = param(False, help="activation checkpointing: recompute each decoder layer in "
                                                     "backward (non-reentrant) instead of storing its activations")
    liger_kernels: bool = param(False, help="Liger's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy "
                                            "(liger-kernel, CUDA); training forwards then return no logits")

    def validate(self, path: str) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{path}.num_heads: {self.num_heads} must divide hidden_size={self.hidden_size}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ConfigError(f"{path}.num_kv_heads: {kv} must divide num_heads={self.num_heads}")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        if self.tokenizer != "bpe":
            from effitrain.config.inputs import check_model_folder

            check_model_folder(f"{path}.tokenizer", self.tokenizer, revision=None, need_tokenizer=True,
                               need_config=False)


@register("model", "hf_arch", builder="effitrain.models.families:build_family",
          summary="A causal LM of a transformers architecture (llama, qwen2, mistral, gpt_neox) from scratch")
@dataclass
class FamilyParams(LlamaParams):
    """The shape keys of ``llama``, for any of the families below; presets give the published shapes."""
    arch: Literal["llama", "qwen2", "mistral", "gpt_neox"] = "llama"
    rotary_pct: float = param(1.0, gt=0, le=1, help="gpt_neox: the share of each head that is rotated")
    sliding_window: Optional[int] = param(None, ge=1, help="mistral/qwen2: local attention window (null: none)")


@register("model", "demo_base", builder="effitrain.models.base:build_demo_base",
          summary="A Llama pre-trained on the run's own data first (cached), for fine-tuning recipes on the demo")
@dataclass
class DemoBaseParams(LlamaParams):
    """A fine-tuning method needs a model that has learned something.  With no ``model.path`` to fine-tune, this
    block pre-trains a small base model on the run's data (plain AdamW, cosine), caches it under
    ``$EFFITRAIN_CACHE/base_models``, and hands it to the run; the next run with the same inputs reuses it."""
    base_steps: int = param(300, ge=1, help="optimizer steps of the base model's pre-training")
    base_lr: float = param(3e-3, gt=0, help="peak learning rate of the base model's pre-training")


@register("model", "pretrained", builder="effitrain.models.build:build_pretrained",
          summary="Any AutoModelForCausalLM from a hub name or a local save_pretrained folder")
@dataclass
class PretrainedParams:
    path: str = param(help="hub id or local folder written by save_pretrained")
    tokenizer: Optional[str] = param(None, help="null = the tokenizer saved with the model; a hub id or folder; "
                                     "'bpe' = train a byte-level BPE on the training split")
    vocab_size: Optional[int] = param(None, ge=260, help="with tokenizer=bpe: its size (null = the model's)")
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = None
    gradient_checkpointing: bool = param(False, help="activation checkpointing (non-reentrant)")
    liger_kernels: bool = param(False, help="Liger's fused kernels (liger-kernel, CUDA)")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.inputs import check_model_folder

        check_model_folder(f"{path}.path", self.path, revision=self.revision, need_tokenizer=self.tokenizer is None)
        if self.tokenizer not in (None, "bpe"):
            check_model_folder(f"{path}.tokenizer", self.tokenizer, revision=None, need_tokenizer=True,
                               need_config=False)
