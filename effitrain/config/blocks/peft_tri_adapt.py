"""TriAdaptLoRA (Liang, Wang & Zeng, 2501.08008): the ``tri_adapt_lora`` peft block (the triangular adapter) and the
``tri_adapt_lora`` method (its rank-growth schedule).  They come together: rule ``tri_adapt_lora_pair``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@register("peft", "tri_adapt_lora", builder="effitrain.peft.tri_adapt:build_tri_adapt_lora",
          summary="TriAdaptLoRA: LoRA B·(L+U)·A whose rank grows in blocks, lower/upper triangular core "
                  "(Liang et al., 2501.08008)")
@dataclass
class TriAdaptLoraParams:
    #: folds into weights like LoRA (effitrain.config.stage_shapes)
    ADAPTER: ClassVar[str] = "mergeable"
    init_rank: int = param(1, ge=1, help="rank every module starts with (the authors' init_rank: 1)")
    add_rank: int = param(4, ge=1, help="ranks one growth adds (the authors' incre_rank_num: reference rank / 2)")
    max_rank: int = param(17, ge=1, help="the most one module may reach, pre-allocated (init_rank + n x add_rank)")
    alpha: float = param(16.0, gt=0, help="the update is scaled by alpha / r, r the module's current rank")
    dropout: float = param(0.05, ge=0, lt=1)
    target_modules: list[str] = param(default_factory=lambda: list(ALL_LINEAR),
                                      help="module-name suffixes (the authors: every linear layer)")
    modules_to_save: list[str] = param(default_factory=list, help="modules trained fully and saved with the adapter")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module, e.g. {ALL_LINEAR}")
        if self.max_rank < self.init_rank or (self.max_rank - self.init_rank) % self.add_rank:
            raise ConfigError(f"{path}.max_rank: {self.max_rank} is not init_rank + a whole number of growths "
                              f"(init_rank={self.init_rank}, add_rank={self.add_rank}); e.g. "
                              f"{self.init_rank + 4 * self.add_rank}")

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        from effitrain.config.inputs import check_target_modules

        check_target_modules(f"{path}.target_modules", self.target_modules, spec)


@register("method", "tri_adapt_lora", builder="effitrain.methods.tri_adapt_lora:build_tri_adapt_growth",
          summary="TriAdaptLoRA's rank growth: Frobenius-norm importance, threshold from a linear/exponential "
                  "schedule (Liang et al., 2501.08008)")
@dataclass
class TriAdaptGrowthParams:
    reference_rank: int = param(8, ge=1, help="the average rank the budget aims at (the authors' reference_rank)")
    budget: Optional[int] = param(None, ge=1, help="total rank over all modules; null = reference_rank x modules")
    warmup: int = param(0, ge=0, help="optimizer steps before the first growth (the authors' init_warmup)")
    interval: int = param(10, ge=1, help="optimizer steps between two allocations (the authors' incre_interval)")
    growth: Literal["linear", "exponential"] = param("linear", help="how the number of growing modules follows "
                                                                    "progress (the paper's best: linear)")
    orth_reg_weight: float = param(0.5, ge=0, help="weight of the ||AA^T-I|| + ||B^TB-I|| regulariser "
                                                   "(the authors' default 0.5; 0 = off)")


def _peft_name(spec) -> str:
    return spec.blocks["peft"].name


def _has_growth(spec) -> bool:
    return any(block.name == "tri_adapt_lora" for block in spec.methods.values())


@rule("tri_adapt_lora_pair", "TriAdaptLoRA's adapter (peft=tri_adapt_lora) and its rank growth "
                             "(methods.tri_adapt_lora) come together")
def _pair(spec, env) -> Optional[str]:
    peft, growth = _peft_name(spec) == "tri_adapt_lora", _has_growth(spec)
    if growth and not peft:
        return (f"methods.tri_adapt_lora grows the ranks of TriAdaptLoRA modules, but peft is "
                f"'{_peft_name(spec)}'; use peft=tri_adapt_lora (or +recipe=tri_adapt_lora)")
    if peft and not growth:
        return ("peft=tri_adapt_lora without methods.tri_adapt_lora would train every module at init_rank for the "
                "whole run; add methods: {tri_adapt_lora: {}} (or use +recipe=tri_adapt_lora)")
    return None
