"""8-bit optimizer state through bitsandbytes: the ``adamw_8bit`` block and block-wise 8-bit moment storage for
effitrain's own optimizers (GaLore's ``state_bits: 8``).

bitsandbytes quantises each block of 256 values with its own absmax scale onto a non-linear "dynamic" code (signed
for the first moment, unsigned for the second), which is what keeps 8-bit Adam as good as 32-bit (Dettmers et al.,
2110.02861).  We reuse its kernels rather than re-implementing the code book.
"""

from __future__ import annotations

from typing import Optional

import torch

from effitrain.optim.param_groups import decay_split, named_trainable

BLOCKSIZE = 256


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # the rule `eight_bit_optimizer_device` refuses this before a run starts
        raise RuntimeError("8-bit optimizer state needs bitsandbytes (pip install 'effitrain[methods]')") from exc
    return bnb


def build_adamw_8bit(params, model: torch.nn.Module, *, max_steps=None) -> torch.optim.Optimizer:
    from effitrain.optim.per_layer import maybe_per_layer
    bnb = _bnb()
    decay, no_decay = decay_split((n, p) for _, n, p in named_trainable(model))
    groups = [g for g in ({"params": decay, "weight_decay": params.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return maybe_per_layer(bnb.optim.AdamW8bit(groups, lr=params.lr, betas=(params.beta1, params.beta2),
                                               eps=params.eps, min_8bit_size=params.min_8bit_size), params)


_CODES: dict[tuple[bool, str], torch.Tensor] = {}


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        _CODES[key] = _bnb().functional.create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


class QuantizedMoment:
    """Stores one moment tensor in ``state`` as ``<key>_q`` (uint8) + ``<key>_absmax`` (fp32 per 256 values).

    ``load`` returns an fp32 working copy and ``store`` re-quantises it, so the persistent state is 8-bit and only
    one parameter's moments are ever in fp32 at a time.  Tensors below ``min_size`` elements stay fp32, as in
    bitsandbytes (their quantisation error would cost more than they save).
    """

    def __init__(self, key: str, signed: bool, min_size: int = 4096) -> None:
        self.key, self.signed, self.min_size = key, signed, min_size

    def init(self, state: dict, shape, device) -> None:
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)
        if zeros.numel() < self.min_size:
            state[self.key] = zeros
        else:
            self.store(state, zeros)

    def load(self, state: dict) -> torch.Tensor:
        if self.key in state:
            return state[self.key]
        F = _bnb().functional
        q = state[f"{self.key}_q"]
        out = F.dequantize_blockwise(q, absmax=state[f"{self.key}_absmax"], code=_code(self.signed, q.device),
                                     blocksize=BLOCKSIZE)
        return out

    def store(self, state: dict, value: torch.Tensor) -> None:
        if self.key in state or value.numel() < self.min_size:
            state[self.key] = value
            return
        F = _bnb().functional
        q, qs = F.quantize_blockwise(value.contiguous(), code=_code(self.signed, value.device), blocksize=BLOCKSIZE)
        state[f"{self.key}_q"] = q
        state[f"{self.key}_absmax"] = qs.absmax

    def drop(self, state: dict) -> None:
        for suffix in ("", "_q", "_absmax"):
            state.pop(f"{self.key}{suffix}", None)


def moment_slots(bits: int, min_size: Optional[int] = 4096):
    """(exp_avg, exp_avg_sq) storage: plain fp32 tensors for 32 bits, :class:`QuantizedMoment` for 8."""
    if bits == 32:
        return QuantizedMoment("exp_avg", True, min_size=float("inf")), \
               QuantizedMoment("exp_avg_sq", False, min_size=float("inf"))
    _bnb()
    return QuantizedMoment("exp_avg", True, min_size), QuantizedMoment("exp_avg_sq", False, min_size)
