"""Logger block builders: console and metrics.jsonl always, plus the configured tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from effitrain.loggers.sinks import ConsoleSink, JsonlSink, Sink, TensorboardSink, WandbSink


def _base(params, run_dir: Path, max_steps: int, start_step: int) -> list[Sink]:
    return [ConsoleSink(max_steps, start_step, params.progress_bar), JsonlSink(run_dir / "metrics.jsonl")]


def build_console(params, *, run_dir: Path, max_steps: int, start_step: int = 0,
                  config: Optional[dict[str, Any]] = None) -> list[Sink]:
    return _base(params, run_dir, max_steps, start_step)


def build_wandb(params, *, run_dir: Path, max_steps: int, start_step: int = 0,
                config: Optional[dict[str, Any]] = None) -> list[Sink]:
    return _base(params, run_dir, max_steps, start_step) + [WandbSink(params, run_dir, config or {})]


def build_tensorboard(params, *, run_dir: Path, max_steps: int, start_step: int = 0,
                      config: Optional[dict[str, Any]] = None) -> list[Sink]:
    return _base(params, run_dir, max_steps, start_step) + [TensorboardSink(run_dir)]
