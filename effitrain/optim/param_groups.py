"""Select parameters by module-name patterns, the way optimizers and adapters target "attention and MLP".

A pattern is either a plain name, which matches a whole dotted component of the module path (``mlp`` matches
``model.layers.3.mlp.up_proj`` but not ``model.mlp_norm``), a dotted suffix (``self_attn.q_proj``), or a shell glob
against the full path (``model.layers.*.mlp.*``).  Component matching rather than substring matching keeps
``proj`` from silently catching every projection in a model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

import torch

_GLOB = set("*?[")


def module_matches(module_name: str, patterns: Iterable[str]) -> bool:
    parts = module_name.split(".")
    for pattern in patterns:
        if _GLOB & set(pattern):
            if fnmatch.fnmatchcase(module_name, pattern):
                return True
            continue
        want = pattern.split(".")
        n = len(want)
        if any(parts[i:i + n] == want for i in range(len(parts) - n + 1)):
            return True
    return False


def named_trainable(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """``(module_name, param_name, parameter)`` for every trainable parameter, each shared tensor once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield module_name, f"{module_name}.{local}" if module_name else local, p


def split_targeted(model: torch.nn.Module, patterns: Iterable[str], *, matrices_only: bool = True
                   ) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters split into (targeted, rest).  With ``matrices_only`` a targeted module's biases and
    other non-2-D parameters go to ``rest`` (projection needs a matrix)."""
    patterns = list(patterns)
    targeted, rest = [], []
    for module_name, name, p in named_trainable(model):
        hit = module_matches(module_name, patterns) and (p.ndim == 2 or not matrices_only)
        (targeted if hit else rest).append((name, p))
    return targeted, rest


def require_targets(targeted: list, patterns: Iterable[str], model: torch.nn.Module, what: str) -> None:
    """A pattern list that matches nothing is a configuration error, not a silent fall-back to plain Adam."""
    if targeted:
        return
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    from effitrain.registry import ConfigError
    raise ConfigError(f"{what}.target_modules: {list(patterns)} match no trainable 2-D weight of the model; "
                      f"its linear modules are named {names}")


def decay_split(named: Iterable[tuple[str, torch.nn.Parameter]]) -> tuple[list, list]:
    """(decayed, not decayed): matrices decay; biases and norm scales (ndim < 2) do not, as in effitrain's adamw."""
    decay, no_decay = [], []
    for _, p in named:
        (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay
