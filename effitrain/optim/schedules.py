"""Learning-rate schedules as multipliers of the peak lr, one step per optimizer step.

Each is a small picklable callable in a ``LambdaLR``, so DeepSpeed checkpoints the scheduler's position and a
resumed run continues on the same curve.  The callables live in :mod:`effitrain.optim.lr_curves` (torch-free, so
``effitrain plan`` can draw them); a scheduler block's params give theirs with ``multiplier(max_steps, timeline)``.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from effitrain.optim.lr_curves import Constant, Cosine, TimelineLR, WarmupStableDecay  # noqa: F401 (re-exported)


def build(params, optimizer: torch.optim.Optimizer, *, max_steps: int, timeline=None) -> LambdaLR:
    """Every scheduler block: the block's multiplier (``params.multiplier``) in a ``LambdaLR``."""
    return LambdaLR(optimizer, params.multiplier(max_steps, timeline))


def follow_this_horizon(scheduler: LambdaLR):
    """Call before loading a checkpoint into ``scheduler``; the returned function, called after, keeps the schedule
    that was built for *this* launch's ``train.max_steps`` and says what that changed.

    A ``LambdaLR`` checkpoints its callables' fields, so loading would silently bring back the old horizon (a run
    extended from 40 to 60 steps would spend 20 steps at the floor lr).  The declared rule instead: a resumed run
    follows the schedule of its new horizon from the resumed step on — for WSD the stable phase grows and the
    decay moves to the new end; for cosine the curve is re-stretched, so the lr rises at the resume step — and the
    run prints the lr before and after the change."""
    import copy

    declared = [copy.deepcopy(f) for f in scheduler.lr_lambdas]

    def restore(step: int) -> str:
        restored = scheduler.lr_lambdas
        if all(a == b for a, b in zip(restored, declared)):
            return ""
        before = restored[0](scheduler.last_epoch)
        scheduler.lr_lambdas = declared
        after = declared[0](scheduler.last_epoch)
        for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, declared):
            group["lr"] = base * fn(scheduler.last_epoch)
        old = getattr(restored[0], "max_steps", None)
        new = getattr(declared[0], "max_steps", None)
        span = f"from {old} to {new} steps" if old != new else "to this launch's settings"
        peak = scheduler.base_lrs[0]
        return (f"the {type(declared[0]).__name__} schedule now spans {span}; at step {step} the lr goes from "
                f"{before * peak:.3g} to {after * peak:.3g}")

    return restore
