"""Muon: Newton-Schulz orthogonalised momentum on the hidden 2-D weights, AdamW on the rest (torch-free schema).

Jordan et al. (kellerjordan.github.io/posts/muon) and, for LLM scale, Moonlight (Liu et al., 2502.16982): the
update of each hidden m x n weight is scaled by 0.2 * sqrt(max(m, n)) so that its RMS matches AdamW's, which lets
Muon reuse AdamW's learning rate and weight decay.  The update itself is ``torch.optim.Muon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.registry import param, register


@register("optimizer", "muon", builder="effitrain.optim.muon:build_muon",
          summary="Muon: Newton-Schulz orthogonalised momentum on hidden 2-D weights, AdamW on the rest, Moonlight's "
                  "RMS matching (Jordan et al. 2024; Liu et al., 2502.16982)")
@dataclass
class MuonParams:
    lr: float = param(3e-3, gt=0, help="one lr for both parts (Moonlight: reuse AdamW's; effitrain's adamw: 3e-3)")
    weight_decay: float = param(0.1, ge=0, help="decoupled decay, lr * wd, on hidden weights, embedding and head "
                                                "(Moonlight: 0.1); biases and norms never decay")
    momentum: float = param(0.95, ge=0, lt=1, help="Muon's momentum (0.95 in both releases)")
    nesterov: bool = param(True, help="Nesterov momentum (both releases: on)")
    ns_steps: int = param(5, ge=1, lt=100, help="Newton-Schulz iterations (both releases: 5)")
    adjust_lr: Literal["match_rms_adamw", "original"] = param(
        "match_rms_adamw", help="match_rms_adamw: update x 0.2*sqrt(max(m, n)) (Moonlight); original: "
                                "x sqrt(max(1, m/n)) (Jordan's Muon, which then wants its own lr ~0.02: set adamw_lr)")
    adamw_lr: Optional[float] = param(None, gt=0, help="lr of the AdamW part; null = lr (Moonlight)")
    beta1: float = param(0.9, ge=0, lt=1, help="AdamW part (Moonlight: 0.9)")
    beta2: float = param(0.95, ge=0, lt=1, help="AdamW part (Moonlight: 0.95)")
    eps: float = param(1e-8, gt=0, help="AdamW part (Moonlight: 1e-8)")


@register("optimizer", "cosmos", builder="effitrain.optim.cosmos:build_cosmos",
          summary="COSMOS: SOAP-style Adam in each hidden weight's leading gradient eigensubspace, Muon on the rest, "
                  "AdamW on embedding/head/norms (Liu et al., 2502.17410)")
@dataclass
class CosmosParams:
    lr: float = param(1e-3, gt=0, help="lr of the AdamW part (authors' README: 1e-3); hidden weights get lr * lr_ratio")
    lr_ratio: float = param(0.1, gt=0, help="hidden-weight lr / embedding lr (authors' README: 0.1); each hidden "
                                            "update has RMS lr * lr_ratio")
    rank: int = param(64, ge=1, help="r: dimension of the eigensubspace that gets SOAP's update (authors' default "
                                     "64), at most the weight's input side")
    gamma: float = param(0.2, ge=0, help="weight of the Muon part against the SOAP part (authors' default 0.2)")
    weight_decay: float = param(0.0, ge=0, help="decoupled decay, lr * wd (authors' default 0); norms and biases "
                                                "never decay")
    beta1: float = param(0.9, ge=0, lt=1, help="momentum (authors' README: 0.9)")
    beta2: float = param(0.95, ge=0, lt=1, help="second moment and the subspace's EMA of G^T G (authors' README: "
                                                "0.95)")
    eps: float = param(1e-8, gt=0)
