"""Logger block builders: console and metrics.jsonl always, plus the configured tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from effitrain.loggers.sinks import ConsoleSink, JsonlSink, Sink, TensorboardSink, WandbSink
from effitrain.registry import ConfigError


def _construct(what: str, fix: str, make: Callable[[], Sink], made: list[Sink]) -> Sink:
    """Build one sink; a failure (no package, no login, no network, a file in the way) is one ConfigError line,
    and the sinks made before it are closed."""
    try:
        return make()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - trackers fail in many ways; the run must not start half-logged
        for sink in made:
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                pass
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"logger: cannot start {what}: {type(exc).__name__}"
                          f"{': ' + detail if detail else ''}; {fix}") from None


def _base(params, run_dir: Path, max_steps: int, start_step: int) -> list[Sink]:
    sinks: list[Sink] = [ConsoleSink(max_steps, start_step, params.progress_bar)]
    sinks.append(_construct(f"{run_dir / 'metrics.jsonl'}", "the run directory must be writable and "
                            "metrics.jsonl a file", lambda: JsonlSink(run_dir / "metrics.jsonl"), sinks))
    return sinks


def build_console(params, *, run_dir: Path, max_steps: int, start_step: int = 0,
                  config: Optional[dict[str, Any]] = None) -> list[Sink]:
    return _base(params, run_dir, max_steps, start_step)


def build_wandb(params, *, run_dir: Path, max_steps: int, start_step: int = 0,
                config: Optional[dict[str, Any]] = None) -> list[Sink]:
    sinks = _base(params, run_dir, max_steps, start_step)
    fix = ("use logger.mode=offline (and 'wandb sync' later) or set WANDB_API_KEY" if params.mode == "online"
           else "check that wandb is installed and the run directory is writable, or use logger=console")
    return sinks + [_construct("wandb", fix, lambda: WandbSink(params, run_dir, config or {}), sinks)]


def build_tensorboard(params, *, run_dir: Path, max_steps: int, start_step: int = 0,
                      config: Optional[dict[str, Any]] = None) -> list[Sink]:
    sinks = _base(params, run_dir, max_steps, start_step)
    fix = f"TensorBoard writes into the folder {run_dir / 'tensorboard'} (it must not be a file; pip install tensorboard)"
    return sinks + [_construct("tensorboard", fix, lambda: TensorboardSink(run_dir), sinks)]
