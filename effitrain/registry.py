"""The block registry: names in YAML -> typed parameters -> builders.

Every config group (``model``, ``optimizer``, ...) holds a mapping with a ``name:`` key.  The name picks an
:class:`Entry`, whose ``params`` dataclass types and range-checks the remaining keys, and whose ``builder`` is a
``"module:function"`` string imported only when something is built.  That split is deliberate:

* validation (``effitrain check``, the CLI's pre-flight) imports neither torch nor deepspeed, so it answers in well
  under a second and runs before any model, dataset or run directory exists;
* YAML can only name entries registered in Python, never an arbitrary callable, so a recipe from a pull request cannot
  run code.  User plugins register more entries by being imported explicitly (``plugins: [my_pkg.methods]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A user-facing configuration problem: one readable line, reported by the CLI with exit status 2."""


#: what other trainers (Hugging Face's Trainer, TRL, peft, nanoGPT) call a parameter -> effitrain's name for it; a
#: spelling close to none of ours ('learning_rate' vs 'lr') is still recognised.  Used only when the name exists.
ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "wd": "weight_decay", "adam_beta1": "beta1", "adam_beta2": "beta2",
    "adam_epsilon": "eps", "epsilon": "eps", "max_grad_norm": "clip_grad_norm", "gradient_clipping": "clip_grad_norm",
    "grad_clip": "clip_grad_norm", "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_train_steps": "max_steps", "num_train_steps": "max_steps", "total_steps": "max_steps",
    "num_warmup_steps": "warmup_steps", "warmup": "warmup_steps", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
    "max_seq_length": "seq_len", "max_length": "seq_len", "seq_length": "seq_len", "block_size": "seq_len",
    "context_length": "seq_len", "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "num_hidden_layers": "num_layers", "n_layer": "num_layers", "n_layers": "num_layers",
    "num_attention_heads": "num_heads", "n_head": "num_heads", "num_key_value_heads": "num_kv_heads",
    "n_embd": "hidden_size", "d_model": "hidden_size", "num_generations": "group_size",
    "max_completion_length": "max_new_tokens",
}


def closest(word: str, choices: typing.Iterable[str]) -> typing.Optional[str]:
    """The choice ``word`` most likely meant: its alias (``learning_rate`` -> ``lr``), else the closest spelling."""
    names = [str(c) for c in choices]
    alias = ALIASES.get(str(word).lower())
    if alias in names:
        return alias
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice (see :func:`closest`), or an empty string."""
    near = closest(word, choices)
    return f" (did you mean '{near}'?)" if near else ""


def did_you_mean_key(key: str, keys: typing.Iterable[str]) -> str:
    """Did-you-mean for a dotted key: the last segment among the keys beside it first (``optimizer.learning_rate``
    -> ``optimizer.lr``, not the whole path's nearest spelling ``optimizer.name``), then the whole path, then the
    same name under another parent (``lora.r`` -> ``peft.r``)."""
    keys = [str(k) for k in keys]
    parent, _, leaf = key.rpartition(".")
    siblings = [k[len(parent) + 1:] for k in keys if parent and k.startswith(parent + ".") and "." not in
                k[len(parent) + 1:]]
    near = closest(leaf, siblings) if siblings else None
    if near:
        return f" (did you mean '{parent}.{near}'?)"
    whole = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if whole:
        return f" (did you mean '{whole[0]}'?)"
    same_leaf = sorted(k for k in keys if k.rpartition(".")[2] in (leaf, ALIASES.get(leaf.lower())))
    return f" (did you mean '{same_leaf[0]}'?)" if len(same_leaf) == 1 else ""


def choices_text(choices: typing.Iterable[str]) -> str:
    return ", ".join(sorted(str(c) for c in choices))


# ----------------------------------------------------------------------------------------------------------------
# Parameters: dataclass fields with optional range metadata
# ----------------------------------------------------------------------------------------------------------------

def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, ge: float | None = None,
          gt: float | None = None, le: float | None = None, lt: float | None = None, help: str = "") -> Any:
    """A dataclass field with an inclusive/exclusive range and a help text shown by ``effitrain show``."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_PLURAL.get(args[0], _type_name(args[0]))}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _is_mapping(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    try:  # OmegaConf containers, without importing omegaconf at module import
        from omegaconf import DictConfig
        return isinstance(value, DictConfig)
    except ImportError:  # pragma: no cover
        return False


def _is_sequence(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    try:
        from omegaconf import ListConfig
        return isinstance(value, ListConfig)
    except ImportError:  # pragma: no cover
        return False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in plain Python form.

    Strict on purpose: ``"1e-3"`` is not a number and ``1`` is not a boolean, because a quoted number in YAML is
    almost always a mistake that would otherwise surface as a confusing error deep inside a builder.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append((arg, exc))
        nested = [exc for arg, exc in errors if dataclasses.is_dataclass(arg)]
        if _is_mapping(value) and len(nested) == 1:  # a mapping for an optional nested block: say what is wrong in it
            raise nested[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
                          f"{did_you_mean(value, [str(a) for a in allowed])}")
    if origin in (list, tuple):
        if not _is_sequence(value):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not _is_mapping(value):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (str, Any)
        return {coerce(k, k_tp, key): coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not _is_mapping(value):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return parse_params(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .inf/.nan and Hydra's inf/nan parse as floats
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported parameter type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


_RANGE_CHECKS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
                 "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for bound, (words, ok) in _RANGE_CHECKS.items():
        if meta.get(bound) is not None and not ok(value, meta[bound]):
            raise ConfigError(f"{key}: {value!r} is out of range, it must be {words} {meta[bound]}")


def parse_params(cls: type, values: Mapping[str, Any], path: str, *, ignore: typing.Iterable[str] = ()) -> Any:
    """Build the params dataclass ``cls`` from a mapping, naming ``path.key`` in every error."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    ignored = set(ignore)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ignored:
            continue
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown key{did_you_mean(key, fields)}; "
                              f"valid keys: {choices_text(fields)}")
        full = f"{path}.{key}"
        if isinstance(value, str) and value == "???":  # OmegaConf's mandatory-value marker, never filled in
            raise ConfigError(f"{full}: required, but not set; give it on the command line ({full}=...)")
        kwargs[key] = coerce(value, hints[key], full)
        _check_range(kwargs[key], fields[key].metadata, full)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):  # cross-field rules of one block, e.g. warmup shorter than the run
        check(path)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    group: str
    name: str
    params: type
    builder: str  # "package.module:function", imported lazily
    summary: str

    def load_builder(self) -> Callable[..., Any]:
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {}

    def register(self, group: str, name: str, *, builder: str, summary: str = "") -> Callable[[type], type]:
        """Class decorator for a params dataclass: ``@register("optimizer", "adamw", builder="pkg.mod:fn")``."""
        def wrap(cls: type) -> type:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
            existing = self._entries.setdefault(group, {}).get(name)
            if existing is not None and existing.params is not cls:
                raise ValueError(f"{group} '{name}' is registered twice ({existing.builder} and {builder})")
            doc = summary or (cls.__doc__ or "").strip().splitlines()[0] if (summary or cls.__doc__) else ""
            self._entries[group][name] = Entry(group, name, cls, builder, doc)
            return cls
        return wrap

    def groups(self) -> list[str]:
        return sorted(self._entries)

    def names(self, group: str) -> list[str]:
        return sorted(self._entries.get(group, {}))

    def get(self, group: str, name: Any, path: str | None = None) -> Entry:
        path = path or group
        entries = self._entries.get(group, {})
        if not isinstance(name, str) or name not in entries:
            raise ConfigError(f"{path}.name: unknown {group} '{name}'{did_you_mean(name, entries)}; "
                              f"valid: {choices_text(entries)}")
        return entries[name]

    def parse(self, group: str, block: Any, path: str | None = None) -> "Block":
        """Validate one block mapping (``{name: ..., **params}``) into a :class:`Block`; builds nothing."""
        path = path or group
        if not _is_mapping(block):
            raise ConfigError(f"{path}: expected a mapping with a 'name' key, got {block!r}")
        if "name" not in block:
            raise ConfigError(f"{path}.name: required key is missing; valid: {choices_text(self.names(group))}")
        entry = self.get(group, block["name"], path)
        return Block(entry, parse_params(entry.params, block, path, ignore=("name",)))


@dataclass(frozen=True)
class Block:
    """A validated block: its registry entry and typed parameters."""
    entry: Entry
    params: Any

    @property
    def name(self) -> str:
        return self.entry.name

    def build(self, *args: Any, **context: Any) -> Any:
        """Import the builder and call it as ``builder(params, *args, **context)``."""
        return self.entry.load_builder()(self.params, *args, **context)


REGISTRY = Registry()
register = REGISTRY.register


def load_plugins(modules: typing.Iterable[str]) -> None:
    """Import user plugin modules named explicitly in the config; each registers its own entries."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import '{module}': {exc}") from None
        except SyntaxError as exc:
            raise ConfigError(f"plugins: cannot import '{module}': syntax error in {exc.filename}, line "
                              f"{exc.lineno}: {exc.msg}") from None
        except ConfigError as exc:  # a plugin whose registrations clash or whose own checks refuse
            raise ConfigError(f"plugins: '{module}': {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a plugin failing at import is the user's code, not ours
            import traceback

            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise ConfigError(f"plugins: importing '{module}' failed at {where.filename}:{where.lineno}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
