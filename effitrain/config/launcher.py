"""Checks of the launcher choice (``hydra/launcher=slurm``) and its keys (``hydra.launcher.KEY=VALUE``), before
Hydra composes: one line naming the key and the valid choices.  Torch-free."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import yaml

from effitrain.config.tree import config_root
from effitrain.registry import ConfigError, choices_text, did_you_mean

GROUP = "hydra/launcher"
HYDRA_BUILTIN = ("basic",)
SUBMITIT_PLUGIN = "hydra_plugins.hydra_submitit_launcher"
INSTALL = "pip install 'effitrain[cluster]' (hydra-submitit-launcher)"
# keys that count things: at least 1 (null = SLURM's default where the default is null)
_AT_LEAST_ONE = {"nodes", "tasks_per_node", "timeout_min", "cpus_per_task", "mem_gb"}
_AT_LEAST_ZERO = {"gpus_per_node", "signal_delay_s", "max_num_timeout", "array_parallelism"}


def presets() -> tuple[str, ...]:
    """effitrain's own launcher presets (files in the package's configs/hydra/launcher)."""
    folder = config_root() / "hydra" / "launcher"
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def plugin_installed() -> bool:
    try:
        return importlib.util.find_spec(SUBMITIT_PLUGIN) is not None
    except (ImportError, ValueError):
        return False


def preset_keys() -> list[str]:
    """The keys a SLURM preset takes: submitit's queue configuration (and those the presets set)."""
    keys: set[str] = set()
    for name in presets():
        with open(config_root() / "hydra" / "launcher" / f"{name}.yaml", encoding="utf-8") as fh:
            keys |= {k for k in (yaml.safe_load(fh) or {}) if k not in ("defaults", "_target_")}
    if plugin_installed():
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

        keys |= {f.name for f in dataclasses.fields(SlurmQueueConf) if not f.name.startswith("_")}
    return sorted(keys)


def check_launcher(overrides: list[Any]) -> None:
    """``overrides``: parsed by effitrain.config.compose.parse_overrides."""
    choice = "basic"
    for o in overrides:
        if o.key_or_group == GROUP and not o.is_delete():
            choice = str(o.value())
            valid = presets() + HYDRA_BUILTIN
            if choice not in valid:
                raise ConfigError(f"{GROUP}: unknown launcher '{choice}'{did_you_mean(choice, valid)}; "
                                  f"valid: {choices_text(valid)}")
            if choice in presets() and not plugin_installed():
                raise ConfigError(f"{GROUP}={choice}: needs Hydra's submitit launcher; {INSTALL}")
    for o in overrides:
        key = o.key_or_group
        if not key.startswith("hydra.launcher."):
            continue
        leaf = key.split(".", 2)[2]
        if choice not in presets():
            raise ConfigError(f"{key}: the '{choice}' launcher takes no keys; choose a SLURM preset first, "
                              f"e.g. hydra/launcher=slurm (valid: {choices_text(presets())})")
        valid_keys = preset_keys()
        if leaf.split(".")[0] not in valid_keys:
            raise ConfigError(f"{key}: unknown launcher key{did_you_mean(leaf, valid_keys)}; "
                              f"valid keys: {choices_text(valid_keys)}")
        value = o.value()
        if leaf in _AT_LEAST_ONE | _AT_LEAST_ZERO and value is not None and not o.is_sweep_override():
            low = 1 if leaf in _AT_LEAST_ONE else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key}: expected a whole number >= {low}, got {value!r}")
