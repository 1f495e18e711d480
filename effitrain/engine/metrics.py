"""Throughput, memory and MFU figures for the log lines."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (without sparsity).
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                    "L4": 121e12, "RTX 4090": 165e12}


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since :func:`reset_peaks`: Linux's ``VmHWM``, which (unlike
    ``ru_maxrss``) can be reset, so the second member of a sweep run in one process does not inherit the first
    one's peak; ``ru_maxrss`` (the process's lifetime peak) where ``/proc`` is not there (macOS reports bytes)."""
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peaks() -> None:
    """Start the peak-memory figures afresh for a new run in this process (Linux: ``echo 5 > clear_refs`` resets
    ``VmHWM`` to the current RSS; on a GPU, torch's peak statistics)."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass  # not Linux, or /proc read-only: the figure stays the process's lifetime peak
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak accelerator memory on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


def sparse_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """As :func:`flops_per_token`, counting a masked weight matrix (static sparsity) by its non-zeros: the FLOPs a
    kernel that skips zeros would execute (SPDF's accounting); equal to the dense count for an unmasked model."""
    from effitrain.models.static_sparse import masked_weight_count

    return flops_per_token(model, seq_len) - 6.0 * masked_weight_count(model)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with the parameters plus the attention scores (PaLM, App. B)."""
    # a parameter marked _effitrain_flops_excluded does not run every step (structured_ffn's dense guide); the
    # method that owns it reports its FLOPs itself (a hook's extra_flops)
    # a mixture-of-experts layer's expert weights run for top_k of num_experts experts per token (active, not total)
    from effitrain.models.moe_upcycle import expert_share

    n_params = sum(p.numel() * expert_share(model, name) for name, p in model.named_parameters()
                   if not getattr(p, "_effitrain_flops_excluded", False))
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    return flops_per_token_of(n_params, layers, hidden, seq_len)


def flops_per_token_of(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in _PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None
