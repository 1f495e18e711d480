"""Per-layer weight updates (GaLore, 2403.03507): step each parameter inside the backward pass.

``enable_per_layer_updates(optimizer)`` registers a ``register_post_accumulate_grad_hook`` on every parameter the
optimizer owns.  When autograd has finished a parameter's gradient, the hook runs the optimizer's own update for
that one parameter (its param group, reduced to ``[p]``, with the group's current learning rate) and frees the
gradient at once.  So at most one layer's gradient is alive at a time instead of the whole model's, which is what
lets GaLore train LLaMA 7B on a 24 GB GPU.  The optimizer object is unchanged otherwise: the LR scheduler, the
checkpoint (``state_dict``) and the memory report see the same ``param_groups`` and ``state``; ``optimizer.step()``
becomes a no-op, since every update has been applied by the time DeepSpeed calls it.  ``attach_engine(engine)``
(called by ``train.py`` for any optimizer that has it) turns off DeepSpeed's post-backward all-reduce, which would
otherwise refill every freed gradient with zeros (one process only, so there is nothing to reduce).

Works with any optimizer whose ``step`` loops over ``param_groups`` and skips parameters without a gradient (torch
AdamW, bitsandbytes AdamW8bit, and effitrain's GaLore, APOLLO and Adam-mini).  What it cannot do is anything that
needs all gradients at once; the rule ``per_layer_updates_limits`` refuses those combinations before a run starts:
gradient accumulation, global gradient-norm clipping, ZeRO partitioning, several processes (DeepSpeed all-reduces
gradients after the backward pass, when they are already gone), DeepSpeed's bf16/fp16 master-weight wrapper, and
LISA (which freezes and unfreezes layers under the optimizer).  The non-finite guard still sees the loss and the
gradient norm (accumulated here, without a host sync), but an update is applied as soon as its gradient exists, so a
non-finite step can stop the run and cannot be skipped.
"""

from __future__ import annotations

import types
from typing import Optional

import torch


def _no_op_step(self, closure=None):
    """Every parameter was updated in its backward hook; there is nothing left to do."""
    return None


class PerLayerUpdates:
    """The hooks and bookkeeping attached to one optimizer (``optimizer.per_layer``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._inner_step = optimizer.step          # the unwrapped update, captured before any guard wraps it
        self._group_of = {}
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._group_of[p] = index
        self.grad_sq: Optional[torch.Tensor] = None   # sum of squared gradient norms since the last consume
        self.updates = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]
        optimizer.step = types.MethodType(_no_op_step, optimizer)   # bound, as LR schedulers expect

    def attach_engine(self, engine) -> None:
        """Keep DeepSpeed from re-creating the freed gradients as zeros after backward (one process: no reduce)."""
        engine.enable_backward_allreduce = False

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        g = p.grad.detach()
        sq = torch.linalg.vector_norm(g.float()) ** 2
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq
        opt = self.optimizer
        groups = opt.param_groups
        group = groups[self._group_of[p]]
        opt.param_groups = [{**group, "params": [p]}]
        try:
            self._inner_step()
        finally:
            opt.param_groups = groups
        p.grad = None
        self.updates += 1

    def consume_grad_norm(self) -> Optional[torch.Tensor]:
        """The gradient norm of the step just taken (all parameters), and reset for the next one."""
        sq, self.grad_sq = self.grad_sq, None
        return None if sq is None else sq.sqrt()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def enable_per_layer_updates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    optimizer.per_layer = PerLayerUpdates(optimizer)
    optimizer.attach_engine = optimizer.per_layer.attach_engine
    return optimizer


def maybe_per_layer(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """What every optimizer builder returns: the optimizer, with per-layer updates if the block asks for them."""
    if getattr(params, "per_layer_updates", False):
        return enable_per_layer_updates(optimizer)
    return optimizer


def per_layer_grad_norm(optimizer) -> Optional[torch.Tensor]:
    """The gradient norm accumulated by the per-layer hooks (None for an ordinary optimizer)."""
    per_layer = getattr(optimizer, "per_layer", None)
    return None if per_layer is None else per_layer.consume_grad_norm()
