"""``methods: {export_depths: {layers: [...]}}``: at the end of training, write the sub-model of each listed depth as
its own ``save_pretrained`` folder (``RUN_DIR/final_model_depths/depth_K``) — the many-in-one model of Sorted LLaMA /
SortedNet handed out as the separate models it contains.

Depth ``K`` keeps the embeddings, the first ``K`` decoder layers, the final norm and the LM head: exactly the
sub-model the layerwise objective trained (``head(norm(hidden_states[K]))``), loadable with
``AutoModelForCausalLM`` and evaluated like any model (``effitrain evaluate``); its config says ``num_hidden_layers:
K``.  The run's eval lines already carry each depth's held-out loss (``eval_loss_depth/K``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from effitrain.engine.events import Hook
from effitrain.models.transforms import decoder_layers


def truncate_to_depth(model: torch.nn.Module, depth: int) -> torch.nn.Module:
    """A copy of ``model`` with only its first ``depth`` decoder layers (config updated to match)."""
    copied = copy.deepcopy(model)
    prefix, layers = decoder_layers(copied)
    if not 1 <= depth <= len(layers):
        raise ValueError(f"depth {depth} is outside 1..{len(layers)}")
    parent = copied.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else copied
    setattr(parent, prefix.rpartition(".")[2], torch.nn.ModuleList(list(layers)[:depth]))
    config = copied.config
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = depth
    if isinstance(layer_types, list):
        config.layer_types = layer_types[:depth]
    return copied


class ExportDepths(Hook):
    name = "export_depths"

    def __init__(self, layers: list[int]) -> None:
        self.layers = list(layers)

    def on_fit_end(self, state: Any) -> None:
        if state.rank != 0:
            return
        from transformers import AutoTokenizer

        from effitrain.peft.adapters import _unwrap

        model = _unwrap(state.model)
        tokenizer_dir = Path(state.run_dir) / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir.is_dir() else None
        out = Path(state.run_dir) / "final_model_depths"
        for depth in self.layers:
            folder = out / f"depth_{depth}"
            truncate_to_depth(model, depth).save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)


def build_export_depths(params: Any) -> ExportDepths:
    return ExportDepths(params.layers)
