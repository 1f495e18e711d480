"""Weight refactorization and momentum reset (Glentis et al., 2505.22922) as a hook over low-rank layers
(effitrain/methods/low_rank_refresh.py), with the rule that keeps it sound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effitrain.config.rules import rule
from effitrain.registry import ConfigError, param, register


@register("method", "low_rank_refresh", builder="effitrain.methods.low_rank_refresh:build_low_rank_refresh",
          summary="every interval steps: re-split each low-rank layer's B·A into balanced SVD factors and/or reset "
                  "the optimizer's moments (Glentis et al., 2505.22922)")
@dataclass
class LowRankRefreshParams:
    interval: int = param(200, ge=1, help="optimizer steps between two refreshes (the paper's value is not read, "
                                          "see the recipe card)")
    refactorize: bool = param(True, help="weight refactorization: B <- U sqrt(S), A <- sqrt(S) V^T from the SVD of "
                                         "B·A (needs peft=sltrain); the factors' optimizer state is dropped")
    reset_momentum: bool = param(True, help="momentum reset: drop every parameter's optimizer state (a fresh AdamW)")

    def validate(self, path: str) -> None:
        if not (self.refactorize or self.reset_momentum):
            raise ConfigError(f"{path}: refactorize and reset_momentum are both false, so the hook would do nothing; "
                              f"set one of them to true or drop the method")


def _refactorizing(spec) -> bool:
    return any(block.name == "low_rank_refresh" and block.params.refactorize for block in spec.methods.values())


@rule("refactorize_needs_low_rank", "methods.low_rank_refresh.refactorize re-splits low-rank factors: it needs "
                                    "peft=sltrain")
def _needs_low_rank(spec, env) -> Optional[str]:
    if _refactorizing(spec) and spec.block("peft").name != "sltrain":
        return (f"methods.low_rank_refresh.refactorize=true re-splits the B·A factors of peft=sltrain layers; this "
                f"run has peft={spec.block('peft').name}. Add peft=sltrain, or set "
                f"methods.low_rank_refresh.refactorize=false to keep only the momentum reset")
    return None
