"""Target data: a held-out domain of the pool, local files, or a `datasets` id -> a Dataset with a `text` column."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from effitrain.registry import ConfigError


def _domain_indices(ds: Any, domain: str) -> np.ndarray:
    import pyarrow.compute as pc

    if "domain" not in ds.column_names:
        raise ConfigError("selection.target.domain: the pool has no `domain` column; name target files with "
                          "selection.target.path instead")
    hits = []
    offset = 0
    for batch in ds.select_columns(["domain"]).with_format("arrow").iter(batch_size=65536):
        mask = pc.equal(batch.column("domain"), domain).to_numpy(zero_copy_only=False)
        hits.append(np.flatnonzero(mask) + offset)
        offset += batch.num_rows
    return np.concatenate(hits) if hits else np.zeros(0, dtype=np.int64)


def _domains(ds: Any) -> list[str]:
    import pyarrow.compute as pc
    return sorted(set(pc.unique(ds.data.column("domain")).to_pylist())) if "domain" in ds.column_names else []


def resolve_target(target: Any, pool: Any, seed: int) -> tuple[Any, Any]:
    """Return ``(target_dataset_or_None, candidates)``.

    ``candidates`` is the pool's train split, minus the target examples when they were drawn from it (``domain`` with
    ``split: train``), so the target is never trained on and the eval split stays a clean measurement.
    """
    train = pool["train"]
    if target is None:
        return None, train
    rng = np.random.default_rng(seed)
    if target.domain is not None:
        source = pool[target.split] if target.split in pool else None
        if source is None:
            raise ConfigError(f"selection.target.split: the pool has no '{target.split}' split; "
                              f"valid: {', '.join(pool.keys())}")
        idx = _domain_indices(source, target.domain)
        if len(idx) == 0:
            from effitrain.registry import did_you_mean
            doms = _domains(source)
            raise ConfigError(f"selection.target.domain: no '{target.domain}' examples in the {target.split} split"
                              f"{did_you_mean(target.domain, doms)}; domains: {', '.join(doms)}")
        chosen = np.sort(rng.permutation(idx)[:target.max_examples])
        tgt = source.select(chosen).select_columns(["text"])
        if target.split == "train":
            keep = np.setdiff1d(np.arange(len(train)), chosen, assume_unique=True)
            train = train.select(keep)
        return tgt, train
    import datasets

    if target.path is not None:
        files = []
        import glob
        for pattern in target.path:
            found = sorted(glob.glob(os.path.expanduser(pattern)))
            if not found:
                raise ConfigError(f"selection.target.path: no file matches '{pattern}'")
            files += found
        ext = {os.path.splitext(f)[1].lower() for f in files}
        kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
        if len(ext) != 1 or next(iter(ext)) not in kinds:
            raise ConfigError(f"selection.target.path: expected files of one kind among "
                              f"{', '.join(kinds)}, got {', '.join(sorted(ext))}")
        from effitrain.data.inspect import SMALL_BYTES, inspect_files

        fmt = kinds[next(iter(ext))]
        small = sum(os.path.getsize(f) for f in files) <= SMALL_BYTES
        for deep in ((True,) if small else (False, True)):
            inspect_files(files, fmt, key="selection.target.path", text_field=target.text_field, domain_field=None,
                          deep=deep)
            try:
                ds = datasets.load_dataset(fmt, data_files=files, split="train")
                break
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - `datasets` words bad files vaguely; the inspector names them
                if deep:
                    raise ConfigError(f"selection.target.path: cannot read {files[0]} as {fmt}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    else:
        try:
            ds = datasets.load_dataset(target.dataset, split=target.dataset_split)
        except Exception as exc:  # noqa: BLE001 - the hub's errors are many; name the key
            raise ConfigError(f"selection.target.dataset: cannot load '{target.dataset}' "
                              f"(split {target.dataset_split}): {exc}") from None
    field = target.text_field
    for key, col in (("text_field", field), ("task_field", target.task_field)):
        if col is not None and col not in ds.column_names:
            raise ConfigError(f"selection.target.{key}: no column '{col}' in the target data; "
                              f"columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns([field] + ([target.task_field] if target.task_field not in (None, field) else []))
    if field != "text":
        ds = ds.rename_column(field, "text")
    if target.task_field not in (None, field, "task"):
        ds = ds.rename_column(target.task_field, "task")
    n = min(len(ds), target.max_examples)
    return ds.select(np.sort(rng.permutation(len(ds))[:n])), train
