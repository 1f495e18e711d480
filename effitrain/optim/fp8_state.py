"""AdamW with FP8 moments (``optimizer=adamw_fp8``): torchao's ``AdamWFp8``.

torchao stores each moment as ``OptimStateFp8``: E4M3 codes with one fp32 scale per ``block_size`` values (the
block's absolute maximum mapped onto E4M3's range), dequantised for the update and re-quantised after it.  The
update itself is torch's AdamW arithmetic in fp32, compiled with ``torch.compile`` on the first step.
"""

from __future__ import annotations

import torch

from effitrain.optim.adamw import decay_groups


def build_adamw_fp8(params, model: torch.nn.Module, *, max_steps=None) -> torch.optim.Optimizer:
    from torchao.optim import AdamWFp8

    return AdamWFp8(decay_groups(model, params.weight_decay), lr=params.lr, betas=(params.beta1, params.beta2),
                    eps=params.eps, weight_decay=params.weight_decay, block_size=params.block_size)
