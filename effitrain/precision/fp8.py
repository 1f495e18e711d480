"""FP8 training through torchao: float8 linears (``precision=fp8``) and, for ``precision=coat``, FP8 storage of the
activations autograd saves for backward.

torchao's ``convert_to_float8_training`` swaps ``nn.Linear`` modules for ``Float8Linear``: each matmul of forward and
backward casts its operands to FP8 (E4M3, dynamic scales per tensor or per row) and runs ``torch._scaled_mm``, with
bf16 outputs.  It saves the *high-precision* input for backward (torchao ``float8_linear.py``), so by itself it
saves no activation memory; that is what :class:`Fp8ActivationStorage` adds for ``coat``.
"""

from __future__ import annotations

from typing import Any, Callable

from effitrain.engine.events import Hook
from effitrain.precision.plan import PrecisionPlan

# torch._scaled_mm needs both matmul dimensions divisible by 16
_FP8_ALIGN = 16


def float8_module_filter(skip_modules: list[str]) -> Callable[[Any, str], bool]:
    """Which linears become Float8Linear: not a skipped name (lm_head: the logits are where FP8 error shows most,
    as in torchao's and COAT's own scripts), and both dimensions FP8-aligned."""
    import torch

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return True  # containers: let torchao recurse into them
        if any(name in fqn for name in skip_modules):
            return False
        return module.in_features % _FP8_ALIGN == 0 and module.out_features % _FP8_ALIGN == 0

    return keep


def convert_linears_to_float8(model: Any, scaling: str, skip_modules: list[str]) -> Any:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(scaling)
    return convert_to_float8_training(model, module_filter_fn=float8_module_filter(skip_modules), config=config)


def float8_plan(params: Any, ds_section: dict[str, Any]):
    def prepare(model: Any) -> Any:
        return convert_linears_to_float8(model, params.scaling, list(params.skip_modules))

    hooks: tuple = ()
    if params.mode == "coat":
        hooks = (Fp8ActivationStorage(group_size=params.group_size, min_numel=params.min_numel),)
    return PrecisionPlan(params.mode, ds_section, prepare_model=prepare, hooks=hooks)


# -- FP8 storage of saved activations (COAT's activation compression) --------------------------------------------

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_groups(x: Any, group_size: int):
    """``x`` as FP8 E4M3 codes with one scale per ``group_size`` consecutive values (zero-padded at the end): the
    scale maps each group's absolute maximum onto E4M3's largest value, as in COAT's per-group quantizer."""
    import torch

    flat = x.detach().reshape(-1)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(-1, group_size).float()
    scale = groups.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    codes = (groups / scale).to(torch.float8_e4m3fn)
    return codes, scale.to(torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)


def dequantize_groups(codes: Any, scale: Any, shape: Any, dtype: Any) -> Any:
    values = (codes.float() * scale.float()).reshape(-1)
    n = 1
    for d in shape:
        n *= d
    return values[:n].view(shape).to(dtype)


class Fp8ActivationStorage(Hook):
    """Stores the bf16/fp16 tensors autograd saves for backward as FP8 codes + per-group scales.

    Only half-precision tensors are packed: under mixed precision they are the activations proper, while the fp32
    tensors a model saves are numerically delicate statistics (SDPA's log-sum-exp, the fp32 logits of the
    cross-entropy, RMSNorm's upcast input) that an FP8 code would distort through an exponential or a division.

    Entered at ``batch_start`` and left at ``after_forward``, so only the training forward packs (evaluation runs
    without autograd).  Parameters (and views of them, e.g. a transposed weight) are left alone: they are kept
    anyway, and quantising them would change the weight gradient's operand, not save memory.  Unpacking happens in
    backward, outside the context, through the functions recorded at pack time.
    """

    name = "fp8_activation_storage"

    def __init__(self, group_size: int = 16, min_numel: int = 4096) -> None:
        self.group_size, self.min_numel = group_size, min_numel
        self._context = None
        self._param_storages: set[int] = set()
        self.packed_bytes = 0    # bytes stored for the last forward, and what they would have been: for tests
        self.original_bytes = 0  # and the memory benchmark

    def _pack(self, tensor: Any) -> Any:
        import torch

        if (tensor.dtype not in (torch.bfloat16, torch.float16) or tensor.numel() < self.min_numel
                or tensor.untyped_storage().data_ptr() in self._param_storages):
            return tensor
        codes, scale = quantize_groups(tensor, self.group_size)
        self.original_bytes += tensor.numel() * tensor.element_size()
        self.packed_bytes += codes.numel() * codes.element_size() + scale.numel() * scale.element_size()
        return (codes, scale, tuple(tensor.shape), tensor.dtype)

    @staticmethod
    def _unpack(packed: Any) -> Any:
        if isinstance(packed, tuple):
            return dequantize_groups(*packed)
        return packed

    def enter(self, model: Any) -> None:
        import torch

        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.packed_bytes = self.original_bytes = 0
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._context.__enter__()

    def leave(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def on_batch_start(self, state: Any) -> None:
        self.enter(state.model)

    def on_after_forward(self, state: Any) -> None:
        self.leave()
