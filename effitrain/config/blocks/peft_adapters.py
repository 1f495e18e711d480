"""PEFT adapters through `peft` (LoRA, DoRA, PiSSA, IA3, prefix tuning) and the unified view's MAM adapter.

Each option is a ``peft`` group block: ``build(params, model) -> model``.  Target-module patterns follow `peft`:
a name matches a module whose dotted name ends with it (``q_proj`` matches ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class _LoraCommon:
    #: what a stage's final model keeps of it (effitrain.config.stage_shapes): an adapter merge_adapters can fold
    ADAPTER: ClassVar[str] = "mergeable"
    r: int = param(8, ge=1, help="adapter rank (LoRA paper: 4-8 on GPT-3)")
    alpha: float = param(16.0, gt=0, help="the update is scaled by alpha / r")
    dropout: float = param(0.05, ge=0, lt=1)
    target_modules: list[str] = param(default_factory=lambda: ["q_proj", "v_proj"],
                                      help="module-name suffixes (LoRA paper: W_q and W_v)")
    modules_to_save: list[str] = param(default_factory=list, help="modules trained fully and saved with the adapter")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module, e.g. {LLAMA_ATTN}")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.inputs import check_target_modules

        check_target_modules(f"{path}.target_modules", self.target_modules, spec)


@register("peft", "lora", builder="effitrain.peft.adapters:build_lora",
          summary="LoRA: frozen base, trainable low-rank update B·A (Hu et al., 2106.09685)")
@dataclass
class LoraParams(_LoraCommon):
    pass


@register("peft", "dora", builder="effitrain.peft.adapters:build_dora",
          summary="DoRA: LoRA on the direction, a trained magnitude vector (Liu et al., 2402.09353)")
@dataclass
class DoraParams(_LoraCommon):
    pass


@register("peft", "pissa", builder="effitrain.peft.adapters:build_pissa",
          summary="PiSSA: LoRA initialised from the principal singular vectors of W (Meng et al., 2404.02948)")
@dataclass
class PissaParams(_LoraCommon):
    niter: Optional[int] = param(4, ge=1, help="fast randomised SVD iterations (null = exact SVD)")


@register("peft", "ia3", builder="effitrain.peft.adapters:build_ia3",
          summary="(IA)^3: learned vectors rescaling keys, values and FFN activations (Liu et al., 2205.05638)")
@dataclass
class IA3Params:
    ADAPTER: ClassVar[str] = "mergeable"
    target_modules: list[str] = param(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = param(default_factory=lambda: ["down_proj"],
                                           help="targets whose *input* is scaled (must be a subset of target_modules)")

    def validate(self, path: str) -> None:
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ConfigError(f"{path}.feedforward_modules: {extra} are not in target_modules")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.inputs import check_target_modules

        check_target_modules(f"{path}.target_modules", self.target_modules, spec, method="IA3")


@register("peft", "prefix", builder="effitrain.peft.adapters:build_prefix",
          summary="Prefix tuning: trained key/value prefixes in every attention layer (Li & Liang, 2101.00190)")
@dataclass
class PrefixParams:
    #: prompt learning adds computation: it cannot be folded into weights
    ADAPTER: ClassVar[str] = "prompt"
    num_virtual_tokens: int = param(10, ge=1, help="prefix length (paper: 10 for table-to-text, 200 for summarization)")
    prefix_projection: bool = param(True, help="re-parameterise the prefix through an MLP (the paper's stabiliser)")
    encoder_hidden_size: int = param(512, ge=1, help="hidden width of that MLP (paper: 512; MAM: 800)")


@register("peft", "mam_adapter", builder="effitrain.peft.mam:build_mam_adapter",
          summary="MAM adapter: prefix tuning on attention + scaled parallel adapter on the FFN (He et al., 2110.04366)")
@dataclass
class MamAdapterParams:
    ADAPTER: ClassVar[str] = "prompt"
    prefix_length: int = param(30, ge=1, help="prefix tokens on attention (paper: 30)")
    prefix_hidden: int = param(800, ge=1, help="prefix re-parameterisation MLP width (paper: 800)")
    adapter_bottleneck: int = param(512, ge=1, help="parallel FFN adapter bottleneck (paper: 512)")
    adapter_scale: float = param(4.0, gt=0, help="s: the adapter output is scaled by s (paper: 4)")
    ffn_modules: list[str] = param(default_factory=lambda: ["mlp"], help="module-name suffixes of the FFN blocks")


PEFT_ADAPTERS = {"lora", "dora", "pissa", "ia3", "prefix", "mam_adapter"}


@rule("peft_zero3_saving",
      "Adapters and model transforms are saved (adapter + merged model) from whole tensors: ZeRO-3 is refused")
def _peft_zero3(spec, env) -> Optional[str]:
    peft = spec.blocks["peft"].name
    stage = spec.blocks["parallelism"].params.stage
    if peft != "none" and stage >= 3:
        return (f"peft '{peft}' is exported as an adapter plus a merged Hugging Face model, which needs every "
                f"weight whole on one process, but ZeRO-3 keeps them partitioned. The frozen base holds no "
                f"optimizer state, so ZeRO-3 saves little here: use parallelism=zero2 (or ddp)")
    return None
