"""PEFT blocks through `peft` (LoRA, DoRA, PiSSA, IA3, prefix tuning) and the final-model export for every run.

:func:`export_final_model` is what the engine calls at the end of a run.  It writes a Hugging Face model that loads
with plain ``AutoModelForCausalLM.from_pretrained`` (no `peft`, no effitrain):

* a `peft` model with a mergeable adapter (LoRA, DoRA, PiSSA, IA3): ``adapter/`` (``save_pretrained`` of the
  adapter) and, at the top of ``out_dir``, the merged model;
* a prompt-learning adapter (prefix tuning, the MAM adapter): ``adapter/`` and the base model, with
  ``"merged": false`` in ``effitrain_export.json`` - learned key/value prefixes and parallel adapters are extra
  computation, not a change of weights, so no merged model can exist;
* an SLTrain model: the dense weights ``W = (alpha/r) B A + S`` in ordinary ``nn.Linear`` layers;
* anything else: ``save_pretrained`` as is.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from effitrain.peft.wrap import peft_package, wrap_model


def _lora(params, **extra) -> Any:
    peft = peft_package()
    return peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=params.r, lora_alpha=params.alpha,
                           lora_dropout=params.dropout, target_modules=list(params.target_modules),
                           modules_to_save=list(params.modules_to_save) or None, **extra)


def build_lora(params, model):
    return wrap_model(model, _lora(params))


def build_dora(params, model):
    return wrap_model(model, _lora(params, use_dora=True))


def build_pissa(params, model):
    # PiSSA puts the top-r singular triplets of W into B·A and keeps the residual as the frozen base, so the
    # adapter starts at the principal subspace instead of zero.  'pissa_niter_k' is the fast randomised SVD.
    init = "pissa" if params.niter is None else f"pissa_niter_{params.niter}"
    return wrap_model(model, _lora(params, init_lora_weights=init))


def build_ia3(params, model):
    peft = peft_package()
    return wrap_model(model, peft.IA3Config(task_type=peft.TaskType.CAUSAL_LM, target_modules=list(params.target_modules),
                                       feedforward_modules=list(params.feedforward_modules)))


def build_prefix(params, model):
    peft = peft_package()
    return wrap_model(model, peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                num_virtual_tokens=params.num_virtual_tokens,
                                                prefix_projection=params.prefix_projection,
                                                encoder_hidden_size=params.encoder_hidden_size))


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------

def _unwrap(model: Any) -> torch.nn.Module:
    """The trained module inside a DeepSpeed engine (``.module``) or the module itself."""
    while not isinstance(model, torch.nn.Module) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def is_peft_model(model: Any) -> bool:
    # A PeftModel exists only once `peft` was imported (by the peft block that built it, or by whoever loaded one):
    # importing it just to ask took ~1.2 s at the end of every run without adapters.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_mergeable(model: Any) -> bool:
    """Whether every adapter of a `peft` model folds into the base weights (LoRA family, IA3 do; prompts don't)."""
    configs = getattr(model, "peft_config", {}) or {}
    return bool(configs) and not any(c.is_prompt_learning for c in configs.values()) and \
        hasattr(model, "merge_and_unload")


def export_final_model(model: Any, tokenizer: Any, out_dir: str | Path, merge: bool = True,
                       keep_adapter: bool = True) -> dict[str, Any]:
    """Write the final model of a run (see the module docstring).  Returns what was written, also saved as
    ``effitrain_export.json``; the engine can log it.  Call on rank 0 with whole (not ZeRO-3-partitioned) weights.

    ``merge=False`` keeps an adapter model's top level as its trained base and points ``adapter/`` at it by the
    relative path ``..`` (the folder stays valid when moved): ``PeftModel.from_pretrained(base, out/"adapter")``
    loads the pair.  ``keep_adapter=False`` writes no ``adapter/`` beside a merged model (``effitrain export
    --merge-adapters``: only the merged model); an adapter that cannot be merged is always kept."""
    from effitrain.models.training_only import detached

    model = _unwrap(model)
    from effitrain.peft.tri_adapt import folded_copy, has_tri_adapt
    if has_tri_adapt(model):  # TriAdaptLoRA's re-parameterised lora_A is saved as the plain LoRA factor it computes
        model = folded_copy(model)
    with detached(model):  # a distillation regressor trained with the model is not part of what it exports
        return _export_final_model(model, tokenizer, Path(out_dir), merge, keep_adapter)


def _export_final_model(model: Any, tokenizer: Any, out: Path, merge: bool, keep_adapter: bool) -> dict[str, Any]:
    from effitrain.models.monarch import fold_monarch, has_monarch
    from effitrain.models.sltrain import has_sltrain, merge_sltrain
    from effitrain.models.sparse_spectral import fold_sparse_spectral, has_sparse_spectral
    from effitrain.models.structured_ffn import fold_structured, has_structured_ffn
    from effitrain.models.static_sparse import fold_masks, has_static_sparsity
    from effitrain.peft.mam import has_parallel_adapters, parallel_adapter_state, strip_parallel_adapters

    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"format": "huggingface", "adapter": None, "merged": None}

    if is_peft_model(model):
        adapter_dir = out / "adapter"
        info["peft_type"] = sorted({str(c.peft_type.value) for c in model.peft_config.values()})
        merged = merge and is_mergeable(model)
        if keep_adapter or not merged:
            # an unmerged top level is the adapter's base: named relative to adapter/, so the pair can move
            _save_adapter(model, adapter_dir, base=None if merged else "..")
            info["adapter"] = "adapter"
        if has_parallel_adapters(model) and info["adapter"]:
            from safetensors.torch import save_file
            save_file(parallel_adapter_state(model), str(adapter_dir / "parallel_adapters.safetensors"))
        if is_mergeable(model):
            # on a copy: the live model keeps training state and its adapter (and this may be a mid-run export)
            final = copy.deepcopy(model)
            final = final.merge_and_unload() if merge else final.unload()
            info["merged"] = merge
            if not merge:
                info["note"] = "the top-level model is the base without the adapter; adapter/ loads on top of it"
        else:
            final = strip_parallel_adapters(copy.deepcopy(model.get_base_model()))
            info["merged"] = False
            info["note"] = ("prompt-learning adapters (prefixes, parallel adapters) add computation and cannot be "
                            "folded into weights; the top-level model is the frozen base, load adapter/ with peft "
                            "(and parallel_adapters.safetensors with effitrain.peft.mam) to use the trained model")
    elif has_static_sparsity(model):
        final = fold_masks(model)
        info["merged"] = True
        info["note"] = "static sparsity masks were folded into plain nn.Linear weights (zeros where masked)"
    elif has_sltrain(model):
        final = merge_sltrain(model)
        info["merged"] = True
        info["note"] = "SLTrain factors (alpha/r)·B·A + S were multiplied out into dense nn.Linear weights"
    elif has_structured_ffn(model):
        final = fold_structured(model)
        info["merged"] = True
        info["note"] = ("structured FFN layers were multiplied out into dense nn.Linear weights (their effective "
                        "matrices, the guide's share included while it had not decayed)")
    elif has_monarch(model):
        final = fold_monarch(model)
        info["merged"] = True
        info["note"] = "Monarch layers were multiplied out into dense nn.Linear weights (their exact matrices)"
    elif has_sparse_spectral(model):
        final = fold_sparse_spectral(model)
        info["merged"] = True
        info["note"] = "sparse spectral layers were multiplied out into dense nn.Linear weights (U diag(S) V^T)"
    else:
        final = model

    final.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "effitrain_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _save_adapter(model: Any, adapter_dir: Path, base: Optional[str]) -> None:
    """``save_pretrained`` of the adapter; ``base``: what its ``adapter_config.json`` names as the base model.  It is
    written into the saved file afterwards: peft reads the base's config while saving (to tell whether the
    vocabulary changed), which a relative path would resolve against the working directory."""
    model.save_pretrained(adapter_dir)
    if base is None:
        return
    for path in adapter_dir.rglob("adapter_config.json"):  # one per adapter (named ones in subfolders)
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base if path.parent == adapter_dir else f"../{base}"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def trainable_report(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; equals ``peft``'s ``get_nb_trainable_parameters`` on a peft model."""
    model = _unwrap(model)
    if is_peft_model(model):
        return tuple(model.get_nb_trainable_parameters())
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
