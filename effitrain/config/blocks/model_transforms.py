"""Model transforms that re-parameterise layers before the optimizer is built (``peft`` group: ``build(params, model)``).

SLTrain lives in the ``peft`` group rather than as a ``fit_start`` hook because it replaces parameters: the optimizer
must be built over the new ones, and the peft builder is the step that runs between the model and the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.registry import ConfigError, param, register


@register("peft", "sltrain", builder="effitrain.models.sltrain:build_sltrain",
          summary="SLTrain: linear weights as low-rank B·A plus a fixed-support sparse S (Han et al., 2406.02214)")
@dataclass
class SLTrainParams:
    rank: int = param(128, ge=1, help="rank of B·A (paper: 128 on LLaMA-60M, 256 on 130M/350M)")
    sparsity: float = param(0.03, gt=0, lt=1, help="delta: share of entries in the random sparse support (paper: 0.03)")
    alpha: float = param(32.0, gt=0, help="the low-rank term is scaled by alpha / rank (authors' 60M script: 32 "
                                          "at rank 128, i.e. 0.25)")
    target_modules: list[str] = param(default_factory=lambda: ["self_attn", "mlp"],
                                      help="module-name patterns whose nn.Linear layers are re-parameterised")
    seed: int = param(0, help="seed of the random sparse support")

    def validate(self, path: str) -> None:
        if not self.target_modules:
            raise ConfigError(f"{path}.target_modules: empty; name at least one module pattern")
