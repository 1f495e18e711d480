"""Helpers shared by the scorers."""

from __future__ import annotations

from typing import Any, Callable

from effitrain.selection.fingerprints import map_fingerprint, map_num_proc


def batched_map(ds: Any, fn: Callable, *, tag: str, payload: Any, ctx: Any, cpu_parallel: bool = True,
                batch_size: int | None = None, fn_kwargs: dict | None = None, desc: str = "") -> Any:
    """``ds.map(fn, batched=True)`` keeping only the new columns, with an explicit fingerprint."""
    return ds.map(fn, batched=True, batch_size=batch_size or ctx.batch_size,
                  num_proc=map_num_proc(ctx.num_proc, len(ds)) if cpu_parallel else None,
                  fn_kwargs=fn_kwargs or {}, remove_columns=ds.column_names,
                  new_fingerprint=map_fingerprint(ds, tag, payload), desc=desc or f"selection: {tag}")
