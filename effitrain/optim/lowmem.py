"""Low-memory optimizers from pytorch-optimizer (a maintained library), with effitrain's typed parameters.

* APOLLO (Zhu et al., 2412.05270): AdamW moments of a *random* rank-r projection of each targeted 2-D gradient are
  only used to estimate a channel- (or tensor-) wise scaling of the raw gradient, so the state is SGD-sized.
* Adam-mini (Zhang et al., 2406.16793): one second-moment value per parameter block (per attention head for
  q/k, per output neuron elsewhere) instead of one per weight, so v nearly vanishes.
"""

from __future__ import annotations

import torch

from effitrain.optim.param_groups import decay_split, require_targets, split_targeted


def _pytorch_optimizer():
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise RuntimeError("this optimizer needs pytorch-optimizer (pip install 'effitrain[methods]')") from exc
    return pytorch_optimizer


def build_apollo(params, model: torch.nn.Module) -> torch.optim.Optimizer:
    po = _pytorch_optimizer()
    targeted, rest = split_targeted(model, params.target_modules)
    require_targets(targeted, params.target_modules, model, "optimizer")
    decay, no_decay = decay_split(rest)
    # pytorch-optimizer projects exactly the groups that carry a 'rank' key ('random' = APOLLO's Gaussian projection)
    groups = [{"params": [p for _, p in targeted], "rank": params.rank, "update_proj_gap": params.update_proj_gap,
               "scale": params.scale, "projection_type": "random", "weight_decay": params.weight_decay},
              {"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return po.APOLLO([g for g in groups if g["params"]], lr=params.lr, betas=(params.beta1, params.beta2),
                     scale_type=params.scale_type, eps=params.eps, weight_decay=params.weight_decay)


def build_adam_mini(params, model: torch.nn.Module) -> torch.optim.Optimizer:
    po = _pytorch_optimizer()
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if hidden is None or heads is None:
        raise ValueError("adam_mini partitions q/k by attention head and needs model.config.hidden_size and "
                         "num_attention_heads; use optimizer=adamw for this model")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # Adam-mini walks model.named_parameters() itself: it keys its blocks on names (embed, q_proj, k_proj, ...)
    return po.AdamMini(model, lr=params.lr, betas=(params.beta1, params.beta2), weight_decay=params.weight_decay,
                       eps=params.eps, num_embeds=hidden, num_heads=heads, num_query_groups=kv_heads)
