"""Metric sinks.  The engine hands each log line (a flat dict with ``step``) to every sink on rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from effitrain.console import say, terminal


class Sink:
    def on_step(self, step: int) -> None:
        """Called after every optimizer step (cheap: a progress bar tick)."""

    def log(self, line: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink(Sink):
    """``metrics.jsonl``: one JSON object per log line, flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "a", buffering=1)

    def log(self, line: dict[str, Any]) -> None:
        self._fh.write(json.dumps(line, sort_keys=True) + "\n")

    def close(self) -> None:
        self._fh.close()


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{value:.2e}"
        if "bytes" in key:
            return f"{value / 2**20:.0f}MiB"
        return f"{value:.4g}"
    if "bytes" in key and isinstance(value, int):
        return f"{value / 2**20:.0f}MiB"
    return str(value)


# the RL reward and the generation-based eval figures sit next to the losses: they are what a post-training run is
# watched for
_LINE_KEYS = ("loss", "reward", "eval_loss", "eval_accuracy", "eval_reward", "lr", "grad_norm", "tokens_per_s",
              "step_time_s", "mfu", "peak_memory_bytes", "skipped_steps")


class ConsoleSink(Sink):
    """A tqdm bar with loss, lr, tokens/s and ETA on a terminal; plain periodic lines otherwise (and in logs)."""

    def __init__(self, max_steps: int, start_step: int, progress_bar: bool) -> None:
        self._bar = None
        if progress_bar and terminal(err=True).isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=terminal(err=True))

    def on_step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, line: dict[str, Any]) -> None:
        shown = {k: line[k] for k in _LINE_KEYS if k in line}
        if self._bar is not None and "loss" in line:
            self._bar.set_postfix({k: _fmt(k, shown[k]) for k in ("loss", "lr", "tokens_per_s") if k in shown},
                                  refresh=False)
        extra = {k: v for k, v in line.items() if k.startswith("eval_loss/")}
        text = f"step {line['step']}: " + "  ".join(f"{k}={_fmt(k, v)}" for k, v in {**shown, **extra}.items())
        if self._bar is not None:
            # through the bar's own stream: tqdm.write defaults to sys.stdout, which quiet() points at the log file
            self._bar.write(text, file=self._bar.fp)
        else:
            say(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


WANDB_ID_FILE = "wandb_id.txt"


class WandbSink(Sink):
    def __init__(self, params, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb  # optional dependency: effitrain[loggers]

        # the run's W&B id is kept in its directory, so a resumed or requeued run continues the same W&B run
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            import secrets

            run_id = secrets.token_hex(8)  # W&B ids: lower-case letters and digits
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=params.project, entity=params.entity, mode=params.mode, tags=params.tags,
                               dir=str(run_dir), config=config, id=run_id, resume="allow",
                               group=params.group, name=params.run_name or run_dir.name)

    def log(self, line: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])

    def close(self) -> None:
        self._run.finish()


class TensorboardSink(Sink):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, line: dict[str, Any]) -> None:
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, line["step"])

    def close(self) -> None:
        self._writer.close()


class Sinks:
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def on_step(self, step: int) -> None:
        for s in self.sinks:
            s.on_step(step)

    def log(self, line: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(line)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
