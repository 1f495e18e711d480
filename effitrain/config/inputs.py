"""Input checks: the files, folders, credentials and packages a validated config points at, checked before anything
is built.  Torch-free and DeepSpeed-free, like the rest of ``effitrain.config``.

A block's params class opts in with a method ``check_inputs(self, path, *, spec, deep)`` that raises
:class:`~effitrain.registry.ConfigError`.  ``deep=False`` is the pre-flight of every launch (cheap: ``stat`` calls,
a few bytes per file); ``deep=True`` is ``effitrain check``, which also reads local data files record by record
(see :mod:`effitrain.data.inspect`).  Checks that need no block live here (the selection target's files, the
pretrained model's folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Collection, Optional

from effitrain.registry import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt",
                   "spiece.model")


_READ: list[str] = []  # what the checks read through, in words, for `effitrain check` to report


def note_read(text: str) -> None:
    if text not in _READ:
        _READ.append(text)


def what_was_read() -> list[str]:
    """The notes of the checks run since the last call (and forget them)."""
    notes = list(_READ)
    _READ.clear()
    return notes


def check_inputs(spec: Any, *, deep: bool, later: Collection[str] = ()) -> None:
    """Run every block's and method's ``check_inputs`` (the first problem raises).  ``later`` names the groups whose
    inputs an earlier stage of a pipeline writes (its model, a teacher '@stage:NAME'): they are not checked here.
    Where the dataset's check read the data, the domains the config names are checked against the ones found."""
    found = None
    for group, block in spec.blocks.items():
        if group not in later:
            result = _call(block.params, group, spec, deep)
            found = result if group == "dataset" else found
    for name, block in spec.methods.items():
        if "methods" not in later:
            _call(block.params, f"methods.{name}", spec, deep)
    if found is not None and getattr(found, "domains", None):
        check_named_domains(spec, training_domains(spec, found.domains))
    if "selection" not in later:
        _check_selection_target(spec)
        _check_selection_model(spec)
    from effitrain.paths import check_cache_root
    check_cache_root()


def named_domains(spec: Any) -> list[tuple[str, str]]:
    """``(key, domain)`` for every domain the config names: the timeline's mixture and the blocks whose params
    have ``named_domains(path)`` (curriculum orders and phases, Skill-It's graph, selection, a sweep's target)."""
    named: list[tuple[str, str]] = []
    timeline = getattr(spec, "timeline", None)
    mixture = timeline.quantities.get("mixture") if timeline else None
    # a sweep that sets the mixture itself (its members', and a config_from stage's) leaves the declared one a
    # stand-in that never trains: it need not name the data's domains
    sweeps = [s for s in (getattr(spec, "sweep", None), getattr(spec, "concluded_by", None)) if s is not None]
    if any("timeline.mixture" in getattr(s.params, "CONCLUDES", ()) for s in sweeps):
        mixture = None
    for i, (_, weights) in enumerate(mixture.points if mixture is not None else ()):
        named += [(f"timeline.mixture.points[{i}].value.{d}", d) for d in weights]
    blocks = [*spec.blocks.items(), *((("sweep", spec.sweep),) if getattr(spec, "sweep", None) else ())]
    for group, block in blocks:
        fn = getattr(block.params, "named_domains", None)
        if callable(fn):
            named += fn(group)
    return named


def training_domains(spec: Any, found: Collection[str]) -> list[str]:
    """The domains the run trains on, from those found in the data: ``dataset.domains`` keeps some, and generated
    documents (``dataset.procedural_docs``) join as 'procedural'."""
    params = spec.block("dataset").params
    kept = [d for d in found if getattr(params, "domains", None) is None or d in params.domains]
    made: list[str] = []
    if getattr(params, "synthetic", None):  # model-made documents (dataset.synthetic) bring their own domains
        from effitrain.data.synthetic import file_domains

        made = file_domains(params.synthetic) or []
    return sorted(kept) + (["procedural"] if getattr(params, "procedural_docs", 0) else []) + made


def check_named_domains(spec: Any, domains: Collection[str]) -> None:
    """Refuse a domain the config names that the data does not have (found before anything trains, instead of when
    the sampler or a later stage meets it)."""
    from effitrain.registry import choices_text, did_you_mean

    for key, domain in named_domains(spec):
        if domain not in domains:
            raise ConfigError(f"{key}: domain '{domain}' is not in the training data{did_you_mean(domain, domains)}; "
                              f"its domains: {choices_text(sorted(domains))}")


def _check_selection_model(spec: Any) -> None:
    scorer = getattr(spec.blocks["selection"].params, "scorer", None)
    model_path = scorer.get("model_path") if isinstance(scorer, dict) else getattr(scorer, "model_path", None)
    if isinstance(model_path, str) and model_path:
        check_model_folder("selection.scorer.model_path", model_path, revision=None, need_tokenizer=True)


def _call(params: Any, path: str, spec: Any, deep: bool) -> Any:
    fn = getattr(params, "check_inputs", None)
    return fn(path, spec=spec, deep=deep) if callable(fn) else None


def _check_selection_target(spec: Any) -> None:
    target = getattr(spec.blocks["selection"].params, "target", None)
    if target is None or not getattr(target, "path", None):
        return
    from effitrain.data import sources
    from effitrain.data.inspect import check_file_shallow

    from effitrain.data.inspect import SMALL_BYTES, inspect_files

    files = sources.resolve_files(target.path, "selection.target.path")
    fmt = sources.file_format(files, "selection.target.path")
    for f in files:
        check_file_shallow(f, fmt, "selection.target.path")
    if sum(os.path.getsize(f) for f in files) <= SMALL_BYTES:
        inspect_files(files, fmt, key="selection.target.path", text_field=target.text_field, domain_field=None,
                      deep=True)


# ---------------------------------------------------------------------------------------------- shared helpers
def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ``org/name``: absolute, ``./``, ``../``, ``~``, or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


#: what the hub accepts as a repo id (``name`` or ``org/name``); anything else -- a stage's placeholder such as
#: ``<final model of stage base>``, a relative path -- is never looked up, which also spares ``check`` the ~0.25 s
#: import of huggingface_hub and its HTTP client
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def hub_cached_file(repo_id: str, filename: str, revision: Optional[str] = None) -> Optional[str]:
    """The path of ``filename`` of a hub model in the local Hugging Face cache, or None (never downloads)."""
    if not _HUB_REPO_ID.match(repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id, an old huggingface_hub: treat as not cached
        return None
    return found if isinstance(found, str) else None


def model_config_json(path: str, revision: Optional[str] = None) -> Optional[dict]:
    """The ``config.json`` of a local model folder or a cached hub model, or None when it cannot be read."""
    local = Path(path).expanduser()
    candidate = local / "config.json" if local.is_dir() else hub_cached_file(path, "config.json", revision)
    if candidate is None or not Path(candidate).is_file():
        return None
    try:
        data = json.loads(Path(candidate).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def position_limit(config: dict) -> Optional[int]:
    """The longest sequence a model config allows (``max_position_embeddings`` or its other names)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    text = config.get("text_config")
    return position_limit(text) if isinstance(text, dict) else None


def check_model_folder(key: str, name: str, *, revision: Optional[str], need_tokenizer: bool,
                       need_config: bool = True) -> None:
    """A ``save_pretrained`` folder (or a hub id) that a builder will load: exists, has config.json and, where
    the tokenizer comes from it, tokenizer files.  A hub id is checked only offline, against the local cache."""
    if not name.strip():
        raise ConfigError(f"{key}: empty; give a save_pretrained folder or a hub id")
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"{key}: '{name}' is a file; give the folder written by save_pretrained")
        if need_config and not (local / "config.json").is_file():
            raise ConfigError(f"{key}: '{name}' has no config.json, so it is not a save_pretrained model folder")
        config = model_config_json(str(local)) if need_config else {}
        if config is None:
            raise ConfigError(f"{key}: '{name}/config.json' is not valid JSON")
        # transformers' AutoConfig reads model_type (its only fallback is a model name inside the folder's path);
        # "architectures" alone does not let it build the model
        if need_config and not config.get("model_type"):
            raise ConfigError(f"{key}: '{name}/config.json' names no model_type, so transformers cannot tell which "
                              f"model class to build" + (f" ('architectures': {config['architectures']} is not "
                                                         f"enough; add \"model_type\")"
                                                         if config.get("architectures") else ""))
        if need_tokenizer and not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"{key}: '{name}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                              f"save the tokenizer with the model, name one with model.tokenizer=NAME_OR_PATH, or "
                              f"train a byte-level BPE on the data with model.tokenizer=bpe")
        return
    if looks_like_path(name):
        raise ConfigError(f"{key}: '{name}' does not exist (working directory {os.getcwd()})")
    if offline():
        probe = "config.json" if need_config else "tokenizer_config.json"
        if hub_cached_file(name, probe, revision) is None:
            raise ConfigError(f"{key}: '{name}' is not a local folder and not in the Hugging Face cache, and "
                              f"downloads are off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); download it where there is "
                              f"network, or give the path of a save_pretrained folder")


def weight_names(folder: str) -> Optional[list[str]]:
    """The parameter names of a local ``save_pretrained`` folder, read from its safetensors header(s) or shard index
    without loading a tensor (torch-free); None where they cannot be read this way (``.bin`` weights, a hub id)."""
    local = Path(folder).expanduser()
    index = local / "model.safetensors.index.json"
    try:
        if index.is_file():
            return sorted(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        single = local / "model.safetensors"
        if not single.is_file():
            return None
        with open(single, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100 * 2 ** 20:
                return None
            header = json.loads(fh.read(size).decode("utf-8"))
        return sorted(k for k in header if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # damaged weights are the loader's to report, with the file named


def module_suffix_matches(target: str, module: str) -> bool:
    """PEFT's rule for a target-module name: the module's dotted name is the target or ends with ``.target``."""
    return module == target or module.endswith("." + target)


def check_target_modules(key: str, targets: list[str], spec: Any, method: str = "LORA") -> None:
    """A ``pretrained`` model whose layers none of ``targets`` names is refused here, not 20 s later inside PEFT;
    the message lists the model's layer names and PEFT's own default targets for that model type."""
    model = spec.blocks["model"]
    folder = getattr(model.params, "path", None) if model.name == "pretrained" else None
    names = weight_names(folder) if isinstance(folder, str) and folder else None
    if not names:
        return
    modules = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith(".weight") and "." in n})
    if any(module_suffix_matches(t, m) for t in targets for m in modules):
        return
    config = model_config_json(folder) or {}
    model_type = config.get("model_type", "?")
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if not m.rsplit(".", 1)[-1].isdigit()})
    suggestion = peft_default_targets(model_type, method)
    hint = (f"; PEFT's default for {model_type}: {key}=[{','.join(suggestion)}]" if suggestion else "")
    raise ConfigError(f"{key}: {list(targets)} name no layer of the {model_type} model in '{folder}'; its layers: "
                      f"{', '.join(leaves)}{hint}")


def peft_default_targets(model_type: str, method: str = "LORA") -> Optional[list[str]]:
    """PEFT's own table of default target modules per model type for ``method`` (LORA, IA3).

    Read from the source of ``peft.utils.constants`` rather than imported: importing it loads torch, torchao and
    transformers (10 s, and their warnings on the terminal), and ``check`` stays torch-free.  The table is a plain
    dict literal there; anything else (another peft layout) gives None and the message lists the layers only."""
    import ast

    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.origin:
        return None
    source = Path(spec.origin).parent / "utils" / "constants.py"
    wanted = f"TRANSFORMERS_MODELS_TO_{method}_TARGET_MODULES_MAPPING"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == wanted for t in node.targets):
                found = ast.literal_eval(node.value).get(model_type)
                return list(found) if found else None
    except (OSError, SyntaxError, ValueError, AttributeError):
        return None
    return None


def package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
