"""``effitrain export CHECKPOINT [--out DIR] [--merge-adapters]``: a Hugging Face folder from any checkpoint.

The model is rebuilt from the run's own ``config.yaml`` (and recipes) and the tokenizer the run saved in
``RUN_DIR/tokenizer``; the weights come from the checkpoint: DeepSpeed's consolidated fp32 weights
(``zero_to_fp32``) when the run used ZeRO (stage 3's partitions are gathered offline, no processes needed), the
module state otherwise.  The folder is written like a run's ``final_model`` and loads with
``AutoModelForCausalLM.from_pretrained``.  An adapter model (PEFT) is written as its base model plus ``adapter/``
(``AutoPeftModelForCausalLM.from_pretrained(OUT/adapter)`` loads both); ``--merge-adapters`` folds mergeable
adapters into the top-level weights instead, as ``final_model`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from effitrain.registry import ConfigError

TOKENIZER_DIR = "tokenizer"


def _checkpoint_of(path: Path) -> Path:
    """A checkpoint folder, or a run directory (its newest intact checkpoint)."""
    from effitrain.console import say
    from effitrain.engine.checkpoint import newest_verified_checkpoint

    if (path / "COMPLETE").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = newest_verified_checkpoint(path / "checkpoints", report=say)
        if found is None:
            raise ConfigError(f"export: '{path}' has no intact checkpoint")
        return found
    raise ConfigError(f"export: '{path}' is neither a checkpoint (checkpoints/step_N) nor a run directory")


def _state_dict(checkpoint: Path) -> dict[str, Any]:
    import torch

    ds = checkpoint / "ds"
    if any(ds.glob("*optim_states.pt")) and any(ds.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    states = sorted(ds.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ConfigError(f"export: {checkpoint} holds no DeepSpeed model states under ds/")
    return torch.load(states[0], map_location="cpu", weights_only=False)["module"]


def export_checkpoint(path: Path, out: Optional[Path] = None, merge_adapters: bool = False) -> Path:
    from effitrain.config.resume import stored_config, stored_recipes
    from effitrain.config.spec import validate
    from effitrain.engine.checkpoint import CheckpointDamaged, verify_checkpoint

    checkpoint = _checkpoint_of(path)
    try:
        verify_checkpoint(checkpoint)
    except CheckpointDamaged as exc:
        raise ConfigError(f"export: {exc}") from None
    run_dir = checkpoint.parent.parent
    cfg = stored_config(run_dir)
    spec = validate(cfg, stored_recipes(run_dir, cfg))
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ConfigError(f"export: {run_dir} has no saved tokenizer ({TOKENIZER_DIR}/); runs made before "
                          f"effitrain saved it can export only their final_model")
    out = Path(out) if out is not None else run_dir / "exports" / checkpoint.name
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: '{out}' exists and is not empty; choose another --out")

    from transformers import AutoTokenizer

    from effitrain.peft.adapters import export_final_model

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = spec.block("model").build(tokenizer=tokenizer)
    model = spec.block("peft").build(model)
    from effitrain.models.training_only import strip_state

    state = strip_state(_state_dict(checkpoint))  # e.g. a hint regressor that trained with the model: not exported
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ConfigError(f"export: the checkpoint does not fit the run's model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.eval()
    export_final_model(model, tokenizer, out, merge=merge_adapters)
    return out


def export_main(args: list[str]) -> int:
    merge = "--merge-adapters" in args
    rest = [a for a in args if a != "--merge-adapters"]
    out = None
    if "--out" in rest:
        i = rest.index("--out")
        if i + 1 >= len(rest):
            raise ConfigError("export: --out needs a folder")
        out = Path(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    if len(rest) != 1:
        raise ConfigError("export: name one checkpoint or run directory, e.g. "
                          "'effitrain export outputs/run/checkpoints/step_00000100 --out my-model'")
    path = Path(rest[0])
    if not path.exists():
        raise ConfigError(f"export: '{path}' does not exist")
    from effitrain.console import quiet, say

    with quiet():
        written = export_checkpoint(path, out, merge)
        say(f"exported {path} to {written}")
    return 0
