"""Logger block: console progress and metrics.jsonl are always on; this block adds an experiment tracker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.registry import param, register


@register("logger", "console", builder="effitrain.loggers.build:build_console",
          summary="Progress bar and log lines on the console, metrics.jsonl in the run directory")
@dataclass
class ConsoleParams:
    progress_bar: bool = param(True, help="a live tqdm bar (only on a terminal)")


@register("logger", "wandb", builder="effitrain.loggers.build:build_wandb",
          summary="Console + Weights & Biases (offline unless mode: online)")
@dataclass
class WandbParams(ConsoleParams):
    project: str = "effitrain"
    entity: Optional[str] = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    tags: list[str] = param(default_factory=list)


@register("logger", "tensorboard", builder="effitrain.loggers.build:build_tensorboard",
          summary="Console + TensorBoard event files under run_dir/tensorboard")
@dataclass
class TensorboardParams(ConsoleParams):
    pass
