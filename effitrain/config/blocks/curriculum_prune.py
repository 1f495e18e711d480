"""Curricula that prune and order by per-example scores: ``seta`` (dynamic, from the training loss) and ``delt``
(static, from a learnability-quality score).  Torch-free: the builders live in ``effitrain.curriculum``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("curriculum", "seta", builder="effitrain.curriculum.seta:build_seta",
          summary="SeTa: each epoch a random share of the rows, k-means groups of their training losses, a window "
                  "sliding from easy to hard groups (needs objective=weighted_causal_lm)")
@dataclass
class SetaParams:
    prune_ratio: float = param(0.1, ge=0, lt=1, help="share of the rows dropped at random each epoch (authors' CIFAR "
                                                     "script: 0.1; keep ratio clamped to >= 0.1)")
    num_group: int = param(5, ge=1, help="k-means groups of the losses (authors' CIFAR script: 5)")
    window_scale: float = param(0.9, gt=0, le=1, help="share of the groups in the sliding window (authors: 0.9)")
    anneal: float = param(0.875, gt=0, le=1, help="from this fraction of train.max_steps every epoch is a plain "
                                                  "random share (authors' delta: 0.875)")
    initial_loss: float = param(3.0, help="loss assumed for rows not yet trained on (authors: 3)")


@register("curriculum", "delt", builder="effitrain.curriculum.delt:build_delt",
          summary="DELT: learnability-quality score of every row from a proxy, top-r selection, folding order "
                  "(low-to-high score repeated `layers` times)")
@dataclass
class DeltParams:
    select_ratio: float = param(1.0, gt=0, le=1, help="share of the rows kept, highest LQS first (authors' top-r "
                                                      "config: r = 1.0)")
    ordering: Literal["folding", "sorting", "shuffle"] = param("folding", help="folding (paper), sorting "
                                                               "(ascending), shuffle (baseline)")
    layers: int = param(3, ge=1, help="folds of the folding order (authors' config: folding_layer 3)")
    target_domain: Optional[str] = param(None, help="domain of the target rows whose gradient defines quality "
                                                    "(null: all domains)")
    target_rows: int = param(64, ge=1, help="target rows (a random sample of the training rows of target_domain)")
    annotate_rows: int = param(256, ge=2, help="rows given their LQS by the proxy's gradients; a linear scorer on "
                                               "the proxy's mean hidden state, fitted to them, scores the rest "
                                               "(authors: 163,840 annotated, a 125M scorer model)")
    proxy_steps: int = param(100, ge=1, help="training steps of the proxy (authors' annotation: total_iters 100)")
    ct_states: int = param(10, ge=1, help="states at which each row's contribution is computed (authors: "
                                          "every 10th of 100 steps = 10)")
    proxy_batch_size: int = param(16, ge=1, help="rows per proxy step (authors: 8 x 2 accumulation)")
    proxy_lr: float = param(2e-3, gt=0, help="proxy AdamW LR (authors: SGD 0.008 on a pretrained 160M model)")
    proxy_hidden_size: int = param(64, ge=8)
    proxy_layers: int = param(2, ge=1)

    def named_domains(self, path: str) -> list[tuple[str, str]]:
        return [] if self.target_domain is None else [(f"{path}.target_domain", self.target_domain)]


@rule("seta_needs_example_losses", "curriculum seta reads per-example training losses: objective must be "
                                   "weighted_causal_lm (it publishes them)")
def _seta_objective(spec, env) -> Optional[str]:
    if spec.block("curriculum").name != "seta":
        return None
    objective = spec.blocks.get("objective")
    name = objective.name if objective is not None else "causal_lm"
    if name != "weighted_causal_lm":
        return (f"curriculum=seta needs each example's loss, which objective '{name}' does not publish; use "
                f"objective=weighted_causal_lm (with default_weight 1.0 it is the plain mean loss)")
    return None
