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
