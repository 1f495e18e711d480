"""LISA: Layerwise Importance Sampled AdamW (Pan et al., 2403.17919), as an engine hook.

Everything outside the decoder-layer list (token embeddings, final norm, LM head) always trains.  Of the decoder
layers, exactly ``active_layers`` (gamma) train at a time: every ``interval`` (K) optimizer steps a fresh uniform
random set is drawn.  Layers that leave the set are frozen (``requires_grad=False``, gradient dropped) and their
optimizer state is deleted, so optimizer memory stays at gamma layers instead of growing to the whole model.

The optimizer is built over all parameters before the first step; a frozen parameter simply has no gradient, which
torch optimizers (and DeepSpeed stage 0, which skips ``requires_grad=False`` parameters when reducing) leave alone.
ZeRO >= 1 would not: its flat partitions are refused by the ``lisa_needs_unsharded_state`` rule.

The sampling generator's state and the active set are the hook's ``state_dict``, so a resumed run draws exactly the
sets the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from effitrain.engine.events import Hook

#: where common causal-LM classes keep their decoder layers
LAYER_PATHS = ("model.layers", "model.model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "transformer.blocks", "layers")


def find_layers(model: torch.nn.Module, path: Optional[str] = None) -> torch.nn.ModuleList:
    candidates = [path] if path else LAYER_PATHS
    for candidate in candidates:
        obj: Any = model
        for part in candidate.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    where = f"'{path}'" if path else f"any of {', '.join(LAYER_PATHS)}"
    raise ValueError(f"LISA: no decoder layer list at {where} in {type(model).__name__}; "
                     f"set methods.lisa.layers_path to the dotted path of its nn.ModuleList")


def _unwrap_optimizer(optimizer: Any) -> tuple[Any, dict[int, torch.Tensor]]:
    """The innermost torch optimizer and, when a wrapper keeps its own fp32 copies of the model parameters
    (DeepSpeed's unfused fp16/bf16 optimizer at stage 0), a map from model-parameter id to the key of its state."""
    mapping: dict[int, torch.Tensor] = {}
    inner = optimizer
    while inner is not None and hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        low = getattr(inner, "fp16_groups", None) or getattr(inner, "bf16_groups", None)
        high = getattr(inner, "fp32_groups", None)
        if low is not None and high is not None:
            for lo_group, hi_group in zip(low, high):
                if isinstance(hi_group, (list, tuple)):  # per-parameter copies (unfused); flat copies are refused
                    mapping.update({id(lo): hi for lo, hi in zip(lo_group, hi_group)})
        inner = inner.optimizer
    return inner, mapping


class LISA(Hook):
    name = "lisa"

    def __init__(self, active_layers: int = 2, interval: int = 20, layers_path: Optional[str] = None,
                 seed: Optional[int] = None) -> None:
        self.active_layers = active_layers
        self.interval = interval
        self.layers_path = layers_path
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self.active: list[int] = []
        self.switches = 0
        self._layers: Optional[torch.nn.ModuleList] = None
        self._optimizer: Any = None

    # -- events -----------------------------------------------------------------------------------------------
    def on_fit_start(self, state: Any) -> None:
        self._layers = find_layers(state.model, self.layers_path)
        self._optimizer = state.optimizer
        n = len(self._layers)
        if self.active_layers > n:
            raise ValueError(f"LISA: active_layers={self.active_layers} but the model has only {n} decoder layers")
        if self.generator is None:  # not restored from a checkpoint
            seed = self.seed if self.seed is not None else int(getattr(getattr(state.spec, "train", None), "seed", 0))
            self.generator = torch.Generator().manual_seed(seed)
        if not self.active:
            self.active = self._sample()
        self._apply(self.active)

    def on_step_end(self, state: Any) -> None:
        if state.step % self.interval == 0:
            self.switch()
            state.metrics["lisa_switches"] = self.switches

    # -- mechanics ----------------------------------------------------------------------------------------------
    def _sample(self) -> list[int]:
        perm = torch.randperm(len(self._layers), generator=self.generator)
        return sorted(perm[: self.active_layers].tolist())

    def switch(self) -> list[int]:
        """Draw a fresh active set and apply it; returns it."""
        self.active = self._sample()
        self.switches += 1
        self._apply(self.active)
        return self.active

    def _apply(self, active: list[int]) -> None:
        keep = set(active)
        inner, mapping = _unwrap_optimizer(self._optimizer) if self._optimizer is not None else (None, {})
        for index, layer in enumerate(self._layers):
            train = index in keep
            for p in layer.parameters():
                if p.requires_grad == train:
                    continue
                p.requires_grad_(train)
                if not train:
                    p.grad = None
                    if inner is not None:
                        # dropped, not zeroed: a layer drawn again later starts Adam afresh, as in the paper's code
                        inner.state.pop(mapping.get(id(p), p), None)

    # -- checkpoint -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state() if self.generator is not None else None,
                "active": list(self.active), "switches": self.switches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])
        self.active = list(state.get("active", []))
        self.switches = int(state.get("switches", 0))
        if self._layers is not None and self.active:  # restored after fit_start: re-apply the saved set
            self._apply(self.active)


def build_lisa(params) -> LISA:
    return LISA(active_layers=params.active_layers, interval=params.interval, layers_path=params.layers_path,
                seed=params.seed)
