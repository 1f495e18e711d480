"""Static unstructured sparsity (SPDF's sparse pre-training, Thangarasa et al., 2303.10464).

Every targeted ``nn.Linear`` weight is multiplied by a fixed binary mask drawn once: exactly ``round(s * numel)``
entries of each matrix are zero (uniform sparsity across layers, a uniformly random support, as the paper's static
sparsity).  The mask is applied as a re-parameterisation (``torch.nn.utils.prune.custom_from_mask``:
``weight = weight_orig * weight_mask`` in every forward), so the effective weights are exactly sparse whatever the
optimizer, its master copies or ZeRO's flat buffers do: the masked entries get zero gradient and never enter the
forward pass.  The mask is a buffer, saved with the model in every checkpoint, so a resumed run keeps it.

The final model is exported with the masks folded in (:func:`fold_masks`): plain ``nn.Linear`` weights with zeros,
loadable by the stock ``transformers`` class.  SPDF's second phase, dense fine-tuning, is a later stage that starts
from that folder (``transform: densify``) with no mask, so the zeroed weights learn again.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils import prune

from effitrain.optim.param_groups import module_matches

log = logging.getLogger("effitrain")


def apply_static_sparsity(model: nn.Module, *, sparsity: float, target_modules: list[str], seed: int) -> int:
    """Mask every matching ``nn.Linear`` (in module order, one generator); returns the number of masked weights.
    The output head is never masked (SPDF sparsifies the transformer blocks, not embeddings or the head)."""
    generator = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    masked = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head or not module_matches(name, target_modules):
            continue
        numel = module.weight.numel()
        zeros = int(round(sparsity * numel))
        mask = torch.ones(numel, dtype=module.weight.dtype)
        mask[torch.randperm(numel, generator=generator)[:zeros]] = 0
        prune.custom_from_mask(module, "weight", mask.view_as(module.weight).to(module.weight.device))
        masked += 1
    if masked == 0:
        raise ValueError(f"static_sparse: no nn.Linear matches target_modules {target_modules}")
    log.debug("static_sparse: masked %d linear layers at sparsity %.3f", masked, sparsity)
    return masked


def build_static_sparse(params, model: nn.Module) -> nn.Module:
    apply_static_sparsity(model, sparsity=params.sparsity, target_modules=params.target_modules, seed=params.seed)
    return model


def masked_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "weight_mask", None), torch.Tensor)]


def has_static_sparsity(model: nn.Module) -> bool:
    return bool(masked_modules(model))


def fold_masks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose masked weights are plain parameters holding ``weight_orig * weight_mask``."""
    with torch.no_grad():  # the last forward left a non-leaf ``weight``, which deepcopy refuses; the next forward's
        for module in masked_modules(model):  # pre-hook recomputes it anyway
            module.weight = (module.weight_orig * module.weight_mask).detach()
    folded = copy.deepcopy(model)
    for module in masked_modules(folded):
        prune.remove(module, "weight")
    return folded


def masked_weight_count(model: nn.Module) -> int:
    """The number of weights held at zero by a mask (the FLOPs a sparse kernel would skip scale with these)."""
    return int(sum((m.weight_mask == 0).sum() for m in masked_modules(model)))
