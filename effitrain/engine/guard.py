"""The non-finite guard: skip an optimizer step whose loss or gradient norm is NaN/inf, stop after K in a row.

The check runs inside the optimizer's own ``step`` (wrapped at start-up), i.e. after DeepSpeed has reduced, and
possibly partitioned and clipped, the gradients, and before any parameter changes.  It costs one small reduction
and one host sync per optimizer step; the ranks agree through an all-reduce so a skip never desynchronises them.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.distributed as dist

from effitrain.optim.per_layer import per_layer_grad_norm


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.consecutive_bad = 0
        self.total_skipped = 0
        self.last_grad_norm: Optional[torch.Tensor] = None  # of the last step, before clipping
        self._pre_clip_norm: Optional[torch.Tensor] = None
        self._window_loss: Optional[torch.Tensor] = None
        self.last_step_skipped = False

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        inner_step = optimizer.step

        @functools.wraps(inner_step)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if self._finite(optimizer):
                self.last_step_skipped = False
                self.consecutive_bad = 0
                return inner_step(*args, **kwargs)
            self.last_step_skipped = True
            self.consecutive_bad += 1
            self.total_skipped += 1
            return None

        optimizer.step = guarded_step  # DeepSpeed calls the client optimizer's step (wrapped or not) through this

    def watch_clipping(self, engine: Any) -> None:
        """Record the gradient norm just before DeepSpeed clips fp32 gradients itself (no ZeRO, no fp16/bf16:
        ``engine.clip_fp32_gradients``, which keeps no norm and leaves ``get_global_grad_norm()`` None).  Without
        this the norm measured in the optimizer's step is the clipped one (``clip_grad_norm`` at most)."""
        clip = getattr(engine, "clip_fp32_gradients", None)
        if clip is None:
            return

        @functools.wraps(clip)
        def clip_and_record(*args: Any, **kwargs: Any) -> Any:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            if grads:
                self._pre_clip_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()).detach()
            return clip(*args, **kwargs)

        engine.clip_fp32_gradients = clip_and_record

    def arm(self, window_loss: torch.Tensor) -> None:
        """Hand over the summed loss of the micro-batches of the step that is about to be taken."""
        self._window_loss = window_loss

    def _finite(self, optimizer: torch.optim.Optimizer) -> bool:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads \
            else per_layer_grad_norm(optimizer)  # per-layer updates freed the gradients during backward
        if norm is None:
            norm = torch.zeros((), device=device)
        bad = (~torch.isfinite(norm)).float()
        if self._pre_clip_norm is not None:  # a non-finite norm before clipping is a bad step whatever the clip made
            bad = torch.maximum(bad, (~torch.isfinite(self._pre_clip_norm.to(device))).float())
        self.last_grad_norm = self._pre_clip_norm if self._pre_clip_norm is not None else norm.detach()
        self._pre_clip_norm = None
        if self._window_loss is not None:
            bad = torch.maximum(bad, (~torch.isfinite(self._window_loss.to(device))).float())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    @property
    def should_stop(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps

    def state_dict(self) -> dict[str, int]:
        return {"consecutive_bad": self.consecutive_bad, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive_bad = state["consecutive_bad"]
        self.total_skipped = state["total_skipped"]
