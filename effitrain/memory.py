"""Measured memory accounting: bytes read from the live tensors, not estimated from parameter counts.

``memory_report(model, optimizer)`` walks

* the model's parameters (each storage once, so tied embeddings count once) and their ``.grad`` tensors;
* the optimizer's ``state``: every tensor in it, however nested (lists, dicts, helper objects such as
  pytorch-optimizer's projectors), through DeepSpeed wrappers (``.optimizer``) and - for ZeRO's flat fp32 master
  partitions and DeepSpeed's fp16/bf16 master copies - the wrapper's own fp32 groups;
* the process peak since the run started (effitrain.engine.metrics.peak_rss_bytes), and
  ``torch.cuda.max_memory_allocated`` on a GPU.

Tensors are deduplicated by storage pointer, so a view or a tensor referenced twice is counted once.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except RuntimeError:  # meta or otherwise storage-less tensors
        return ("id", id(t))


def _tensor_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except RuntimeError:
        return t.numel() * t.element_size()


def _walk(obj: Any, seen_objs: set[int], depth: int = 0) -> Iterable[torch.Tensor]:
    if depth > 6 or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, seen_objs, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _walk(v, seen_objs, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        # helper objects kept in optimizer state (e.g. a projector holding its matrix)
        yield from _walk(vars(obj), seen_objs, depth + 1)


def _sum_unique(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total


def optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and every optimizer it wraps (DeepSpeed's ZeRO / fp16 / bf16 wrappers keep it in
    ``.optimizer``), outermost first."""
    chain = []
    while optimizer is not None and optimizer not in chain:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


#: attributes where DeepSpeed wrappers keep fp32 master weights (state the optimizer needs besides its moments)
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_groups_flat",
                 "fp32_groups", "fp32_partitioned_groups_flat")


def optimizer_state_bytes(optimizer: Any, *, exclude: Optional[set] = None) -> tuple[int, int]:
    """(state bytes, master-weight bytes) of an optimizer and its wrappers; ``exclude`` holds storage keys already
    counted (the model's parameters), so a master copy that *is* the parameter is not counted twice."""
    seen = set(exclude or ())
    state_bytes = master_bytes = 0
    for opt in optimizer_chain(optimizer):
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            state_bytes += _sum_unique(_walk(state, set()), seen)
        for attr in _MASTER_ATTRS:
            if hasattr(opt, attr) and not isinstance(opt, torch.optim.Optimizer):
                master_bytes += _sum_unique(_walk(getattr(opt, attr), set()), seen)
    return state_bytes, master_bytes


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident set size of this process since the run started and, on a GPU, torch's peak."""
    from effitrain.engine.metrics import peak_rss_bytes

    out = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def held_gradient_bytes(model: Any) -> int:
    """Bytes of the gradients the parameters hold now (``p.grad``); the loop reads it just before the first optimizer
    step, when they exist.  Gradients DeepSpeed keeps in its own flat buffers (ZeRO-2's partitions) are not counted."""
    module = model
    while type(module).__name__ == "DeepSpeedEngine" or not isinstance(module, torch.nn.Module):
        module = module.module
    return _sum_unique([p.grad for p in module.parameters() if p.grad is not None], set())


def memory_report(model: Any, optimizer: Any = None) -> dict[str, int]:
    """Bytes and counts read from the live model and optimizer; JSON-serialisable (the engine puts it in
    ``summary.json`` and the log)."""
    module = model
    while type(module).__name__ == "DeepSpeedEngine" or not isinstance(module, torch.nn.Module):
        module = module.module
    params_seen: set = set()
    grads_seen: set = set()
    param_bytes = grad_bytes = 0
    trainable = total = 0
    counted: set[int] = set()
    for p in module.parameters():
        if id(p) in counted:
            continue
        counted.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        param_bytes += _sum_unique([p], params_seen)
        if p.grad is not None:
            grad_bytes += _sum_unique([p.grad], grads_seen)
    buffer_bytes = _sum_unique(module.buffers(), params_seen)  # e.g. rotary tables, SLTrain's sparse support
    report = {"parameter_bytes": param_bytes, "buffer_bytes": buffer_bytes, "gradient_bytes": grad_bytes,
              "trainable_params": trainable, "total_params": total}
    if optimizer is not None:
        state, master = optimizer_state_bytes(optimizer, exclude=params_seen | grads_seen)
        report["optimizer_state_bytes"] = state
        report["master_weight_bytes"] = master
    peaks = peak_memory_bytes()
    report.update(peaks)
    report["peak_memory_bytes"] = peaks.get("peak_cuda_allocated_bytes", peaks["peak_rss_bytes"])
    return report
