"""Compatibility rules between blocks: the one place that says which combinations are refused, and why.

A rule looks at the validated :class:`~effitrain.config.spec.RunSpec` (and, where it matters, the device) and
returns a message naming what to use instead, or ``None``.  Rules are checked before any model, dataset or run
directory is built, and ``effitrain rules`` prints them as a table.  Block schema modules add their own rules by
calling :func:`rule` at import time, next to the block they constrain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from effitrain.registry import ConfigError


@dataclass(frozen=True)
class Environment:
    """What the launch target offers.  ``None`` fields are unknown (e.g. ``effitrain check`` without a GPU probe)."""
    device_type: Optional[str] = None  # "cpu" or "cuda"
    world_size: Optional[int] = None
    bf16_supported: Optional[bool] = None
    fp8_supported: Optional[bool] = None


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    check: Callable[[Any, Environment], Optional[str]]


RULES: list[Rule] = []


def rule(name: str, description: str) -> Callable[[Callable[[Any, Environment], Optional[str]]], Callable]:
    """Register ``check(spec, env) -> message | None`` under ``name``."""
    def wrap(fn: Callable[[Any, Environment], Optional[str]]) -> Callable:
        if any(r.name == name for r in RULES):
            return fn  # re-import of the same module
        RULES.append(Rule(name, description, fn))
        return fn
    return wrap


def check_rules(spec: Any, env: Environment = Environment()) -> None:
    """Raise :class:`ConfigError` for the first refused combination."""
    for r in RULES:
        message = r.check(spec, env)
        if message:
            raise ConfigError(f"incompatible configuration [{r.name}]: {message}")


def rules_table() -> str:
    width = max((len(r.name) for r in RULES), default=4)
    lines = [f"{'rule'.ljust(width)}  description", f"{'-' * width}  {'-' * 11}"]
    lines += [f"{r.name.ljust(width)}  {r.description}" for r in RULES]
    return "\n".join(lines)


# -- rules that span several blocks ----------------------------------------------------------------------------

@rule("per_layer_updates_limits",
      "per-layer updates step each weight inside backward: refused with grad_accum > 1, gradient clipping, ZeRO >= 1, "
      "several processes, bf16/fp16 (DeepSpeed's master-weight wrapper) and LISA")
def _per_layer_limits(spec, env) -> Optional[str]:
    opt = spec.blocks["optimizer"]
    if not getattr(opt.params, "per_layer_updates", False):
        return None
    why = None
    precision = spec.blocks["precision"].name
    if spec.train.grad_accum > 1:
        why = f"train.grad_accum={spec.train.grad_accum}: the update would run on every micro-batch; use grad_accum 1"
    elif spec.train.clip_grad_norm > 0:
        why = (f"train.clip_grad_norm={spec.train.clip_grad_norm}: global clipping needs every gradient at once; "
               f"set train.clip_grad_norm=0")
    elif spec.blocks["parallelism"].params.stage >= 1:
        why = f"ZeRO stage {spec.blocks['parallelism'].params.stage} partitions the gradients; use parallelism=ddp"
    elif env.world_size is not None and env.world_size > 1:
        why = (f"{env.world_size} processes: DeepSpeed all-reduces gradients after backward, when they are already "
               f"freed; run one process")
    elif precision in ("bf16", "fp16", "fp8", "coat") or (precision == "auto" and env.device_type == "cuda"):
        why = (f"precision={precision} puts DeepSpeed's master-weight wrapper between the gradients and the "
               f"optimizer; use precision=fp32")
    elif any(m.name == "lisa" for m in spec.methods.values()):
        why = "LISA freezes and unfreezes layers under the optimizer; drop methods.lisa"
    if why is None:
        return None
    return f"optimizer.per_layer_updates=true cannot run here: {why}"
