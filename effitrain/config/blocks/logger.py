"""Logger block: console progress and metrics.jsonl are always on; this block adds an experiment tracker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from effitrain.registry import ConfigError, param, register


def _need_package(path: str, logger: str, package: str) -> None:
    from effitrain.config.inputs import package_available

    if not package_available(package):
        raise ConfigError(f"{path}.name: logger={logger} needs the '{package}' package, which is not installed; "
                          f"pip install 'effitrain[loggers]' (or {package}), or use logger=console")


def wandb_credentials() -> bool:
    """Whether W&B can log in without asking: WANDB_API_KEY, or an api key in ~/.netrc for the W&B host."""
    import os

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    from urllib.parse import urlparse
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


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
    group: Optional[str] = None     # runs shown together; a sweep sets its root's name (effitrain.cluster.manifest)
    run_name: Optional[str] = None  # null: the run directory's name; a sweep member: its recipe and overrides

    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        if self.mode == "disabled":
            return
        _need_package(path, "wandb", "wandb")
        if self.mode == "online" and not wandb_credentials():
            raise ConfigError(f"{path}.mode: online needs W&B credentials and none were found (no WANDB_API_KEY, "
                              f"no ~/.netrc entry); set WANDB_API_KEY (or run 'wandb login'), or use "
                              f"{path}.mode=offline and 'wandb sync' later")


@register("logger", "tensorboard", builder="effitrain.loggers.build:build_tensorboard",
          summary="Console + TensorBoard event files under run_dir/tensorboard")
@dataclass
class TensorboardParams(ConsoleParams):
    def check_inputs(self, path: str, *, spec, deep: bool) -> None:
        _need_package(path, "tensorboard", "tensorboard")
        if spec.run_dir:
            from pathlib import Path

            events = Path(spec.run_dir) / "tensorboard"
            if events.exists() and not events.is_dir():
                raise ConfigError(f"{path}: '{events}' exists and is a file; TensorBoard writes its event files "
                                  f"into a folder of that name (move the file or choose another run_dir)")
