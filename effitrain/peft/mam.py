"""The unified view's MAM adapter (He et al., 2110.04366): prefix tuning on attention (through `peft`) plus a
scaled parallel adapter on every FFN block (ours - `peft` has no parallel adapter).

The parallel adapter reads the FFN's input x and adds ``s · W_up ReLU(W_down x)`` to the FFN's output.  It is a
child module of the FFN (``mlp.parallel_adapter``) applied by a forward hook, so every original parameter keeps
its name and the base model still loads into the stock `transformers` class.  ``W_up`` starts at zero, so the
adapted model starts as the base model (as adapters are initialised in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from effitrain.peft.wrap import peft_package, wrap_model


class ParallelAdapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


def _parallel_adapter_hook(module: nn.Module, args, output):
    return output + module.parallel_adapter(args[0]).to(output.dtype)


def _suffix_match(name: str, patterns) -> bool:
    parts = name.split(".")
    return any(parts[-len(p.split(".")):] == p.split(".") for p in patterns)


def add_parallel_adapters(model: nn.Module, ffn_modules, bottleneck: int, scale: float) -> int:
    hidden = model.config.hidden_size
    targets = [m for n, m in model.named_modules() if n and _suffix_match(n, ffn_modules)]
    if not targets:
        from effitrain.registry import ConfigError
        raise ConfigError(f"peft.ffn_modules: {list(ffn_modules)} match no module of {type(model).__name__}")
    ref = next(model.parameters())
    for ffn in targets:
        ffn.parallel_adapter = ParallelAdapter(hidden, bottleneck, scale).to(device=ref.device, dtype=ref.dtype)
        ffn.register_forward_hook(_parallel_adapter_hook)
    return len(targets)


def build_mam_adapter(params, model):
    peft = peft_package()
    add_parallel_adapters(model, params.ffn_modules, params.adapter_bottleneck, params.adapter_scale)
    wrapped = wrap_model(model, peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                   num_virtual_tokens=params.prefix_length,
                                                   prefix_projection=True, encoder_hidden_size=params.prefix_hidden))
    for module in wrapped.modules():  # peft froze the whole base model, our adapters included
        if isinstance(module, ParallelAdapter):
            module.requires_grad_(True)
    return wrapped


def has_parallel_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, ParallelAdapter) for m in model.modules())


def parallel_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k: v.detach().cpu().contiguous() for k, v in base.state_dict().items() if ".parallel_adapter." in k}


def load_parallel_adapters(model: nn.Module, path: str, ffn_modules=("mlp",), scale: float = 4.0) -> nn.Module:
    """Re-attach saved parallel adapters to a base model (sizes are read from the saved tensors)."""
    from safetensors.torch import load_file
    state = load_file(path)
    bottleneck = next(v.shape[0] for k, v in state.items() if k.endswith("down.weight"))
    add_parallel_adapters(model, ffn_modules, bottleneck, scale)
    missing = model.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"parallel adapter keys not in the model: {missing.unexpected_keys[:3]}")
    return model


def strip_parallel_adapters(model: nn.Module) -> nn.Module:
    """Remove the adapters and their hooks (for exporting the stock base model)."""
    for module in model.modules():
        if hasattr(module, "parallel_adapter") and isinstance(module.parallel_adapter, ParallelAdapter):
            del module.parallel_adapter
            for key, hook in list(module._forward_hooks.items()):
                if hook is _parallel_adapter_hook:
                    del module._forward_hooks[key]
    return model
