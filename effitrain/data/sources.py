"""Helpers shared by the dataset builders: one schema (``id``, ``text``, ``domain``), held-out eval, domain filters.

Every source ends as a ``datasets.DatasetDict`` with a ``train`` and an ``eval`` split and exactly the columns
``id`` (str), ``text`` (str) and ``domain`` (str); selection, packing and evaluation rely on nothing else.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from effitrain.registry import ConfigError, choices_text, did_you_mean

COLUMNS = ("id", "text", "domain")
DEFAULT_DOMAIN = "all"

# File extension -> the `datasets` packaged builder that reads it.  Compressed files keep the inner extension.
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def schema_features():
    import datasets

    return datasets.Features({c: datasets.Value("string") for c in COLUMNS})


# what a corpus folder's files may be (a folder given as dataset.path means these files under it)
CORPUS_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz", ".jsonl.bz2",
                     ".jsonl.xz", ".jsonl.zst")


def folder_files(folder: Path) -> list[str]:
    """The data files under ``folder`` (recursively; names starting with '.' skipped, as a writer's temporary
    files are), sorted by path: the order their documents are read in."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(CORPUS_EXTENSIONS)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def resolve_files(patterns: Sequence[str], key: str) -> list[str]:
    """Expand files, globs and folders (relative to the working directory) into a list, sorted per pattern; every
    pattern must match."""
    if not patterns:
        raise ConfigError(f"{key}: no files given; set it to a file, a glob or a list of them")
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{key}: no file matches '{pattern}' (working directory {os.getcwd()})")
            files.extend(matches)
        elif os.path.isfile(expanded):
            files.append(expanded)
        elif os.path.exists(expanded) and not os.path.isdir(expanded):
            raise ConfigError(f"{key}: '{pattern}' is not a regular file (a device, a pipe or a socket); give a file")
        elif os.path.isdir(expanded):  # a corpus folder: its data files, recursively, hidden ones skipped
            found = folder_files(Path(expanded))
            if not found:
                raise ConfigError(f"{key}: '{pattern}' is a directory with no {', '.join(CORPUS_EXTENSIONS)} file "
                                  f"in it; name the files, e.g. '{pattern.rstrip('/')}/*.jsonl'")
            files.extend(found)
        else:
            from effitrain.fsutil import why_missing

            raise ConfigError(f"{key}: file '{pattern}' {why_missing(Path(expanded))} (working directory "
                              f"{os.getcwd()})")
    return [str(Path(f).resolve()) for f in files]


def file_format(files: Sequence[str], key: str) -> str:
    """The single `datasets` builder name for ``files`` (json, parquet or text), from their extensions."""
    formats = set()
    for f in files:
        name = f.lower()
        for comp in _COMPRESSIONS:
            if name.endswith(comp):
                name = name[: -len(comp)]
                break
        ext = os.path.splitext(name)[1]
        if ext not in _FORMATS:
            raise ConfigError(f"{key}: cannot tell the format of '{f}'; use one of "
                              f"{choices_text(_FORMATS)} (optionally compressed)")
        formats.add(_FORMATS[ext])
    if len(formats) > 1:
        raise ConfigError(f"{key}: mixes formats {choices_text(formats)}; give one format per split")
    return formats.pop()


def _standardize_batch(batch: dict, indices: list[int], *, text_field: str, domain_field: Optional[str],
                       id_field: Optional[str], id_prefix: str) -> dict:
    """Rename to id/text/domain and drop rows without text (they would become bare end-of-text tokens)."""
    out: dict[str, list] = {"id": [], "text": [], "domain": []}
    texts = batch[text_field]
    domains = batch[domain_field] if domain_field else None
    ids = batch[id_field] if id_field else None
    for j, text in enumerate(texts):
        if text is None or not str(text).strip():
            continue
        out["text"].append(str(text))
        # a record without an id in a file whose other records have one is numbered like a file without ids (not
        # "None": every such record would share one id, and the eval hold-out ranks documents by their id)
        has_id = ids is not None and ids[j] is not None
        out["id"].append(str(ids[j]) if has_id else f"{id_prefix}-{indices[j]:09d}")
        out["domain"].append(str(domains[j]) if domains is not None else DEFAULT_DOMAIN)
    return out


def standardize(ds, *, text_field: str, domain_field: Optional[str], key: str, id_prefix: str, num_proc: int = 1):
    """Map any text dataset to the ``id``/``text``/``domain`` schema, with errors that name the config key.

    An ``id`` column in the source is kept (as a string); otherwise -- and for a row whose id is missing -- ids are
    ``<id_prefix>-<row>``, stable as long as the files are.
    """
    import datasets

    names = ds.column_names
    if text_field not in names:
        raise ConfigError(f"{key}.text_field: column '{text_field}' not found{did_you_mean(text_field, names)}; "
                          f"columns: {choices_text(names)}")
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError(f"{key}.text_field: column '{text_field}' holds {feature}, not strings")
    if domain_field is not None and domain_field not in names:
        raise ConfigError(f"{key}.domain_field: column '{domain_field}' not found"
                          f"{did_you_mean(domain_field, names)}; columns: {choices_text(names)}")
    # A row without the text (a JSON record lacking the key, a null) is refused, not dropped: silently training on
    # less data than the files hold hides a broken export.  Empty or blank strings are still dropped.
    for field_name, what in ((text_field, "text_field"), (domain_field, "domain_field")):
        if field_name is None:
            continue
        column = arrow_column(ds, field_name)
        if column.null_count:
            import pyarrow.compute as pc

            first = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise ConfigError(f"{key}.{what}: {column.null_count} of {len(ds)} rows have no '{field_name}' "
                              f"(first: row {first + 1}); fix or remove those rows (they are not dropped silently)")
    id_field = "id" if "id" in names else None
    return ds.map(_standardize_batch, batched=True, with_indices=True, remove_columns=names,
                  features=schema_features(), num_proc=num_proc if len(ds) >= 10_000 else None,
                  fn_kwargs={"text_field": text_field, "domain_field": domain_field, "id_field": id_field,
                             "id_prefix": id_prefix},
                  desc="standardizing columns")


def arrow_column(ds, name: str):
    """One column of a ``datasets.Dataset`` as a pyarrow array, in row order (selections applied).

    Goes through Arrow because ``ds[name]`` is a lazy ``Column`` whose element access and iteration cost a Python
    call per row, and even ``with_format("arrow")[:]`` gathers a selection ~100x slower than one ``take``.
    """
    import pyarrow.compute as pc

    try:
        column = ds.data.column(name)
        indices = ds._indices  # the row mapping left by select/filter/shuffle (None when there is none)
        if indices is not None:
            column = pc.take(column, indices.column(0))
    except AttributeError:  # a datasets version without these internals: the public, slower route
        column = ds.select_columns([name]).with_format("arrow")[:].column(name)
    return column.combine_chunks()


def domain_indices(ds) -> dict[str, np.ndarray]:
    """Row indices of every domain, in row order, keyed by domain name (sorted)."""
    if len(ds) == 0:
        return {}
    if hasattr(ds, "rows") and hasattr(ds, "domains"):  # token shards (effitrain.data.shards): a per-row index
        labels = ds.domains()
        return {str(d): np.flatnonzero(labels == d) for d in np.unique(labels)}
    encoded = arrow_column(ds, "domain").dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    return {str(names[code]): np.flatnonzero(codes == code)
            for code in sorted(range(len(names)), key=lambda c: str(names[c]))}


def _id_rank(doc_id: str) -> bytes:
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()


def hold_out(ds, per_domain: int, key: str):
    """Split ``ds`` into (train, eval) with ``per_domain`` eval documents from every domain.

    The eval documents of a domain are those whose id hashes lowest, so the choice depends only on the ids: it is
    the same in every run and process, and it barely moves when documents are added to the files.
    """
    ids = arrow_column(ds, "id").to_pylist()
    eval_rows: list[int] = []
    for domain, rows in domain_indices(ds).items():
        if len(rows) <= per_domain:
            raise ConfigError(f"{key}.eval_examples_per_domain: domain '{domain}' has only {len(rows)} documents, "
                              f"not enough to hold out {per_domain} for evaluation; lower it or give an eval split")
        ranked = sorted(rows.tolist(), key=lambda r: (_id_rank(ids[r]), r))
        eval_rows.extend(ranked[:per_domain])
    eval_rows.sort()
    in_eval = np.zeros(len(ds), dtype=bool)
    in_eval[eval_rows] = True
    return ds.select(np.flatnonzero(~in_eval)), ds.select(eval_rows)


def cap_per_domain(ds, per_domain: int):
    """Keep the first ``per_domain`` documents of every domain (used for a source's own eval split)."""
    keep = np.sort(np.concatenate([rows[:per_domain] for rows in domain_indices(ds).values()] or [np.array([], int)]))
    return ds if len(keep) == len(ds) else ds.select(keep)


def filter_domains(ds, domains: Optional[Sequence[str]], key: str, *, strict: bool = True):
    """Keep only the rows of ``domains``.  With ``strict`` (the train split) a name that is not a domain of ``ds``
    is a ConfigError listing the valid ones; an eval split may simply lack a domain."""
    if domains is None:
        return ds
    by_domain = domain_indices(ds)
    if strict:
        available = sorted(by_domain)
        for d in domains:
            if d not in by_domain:
                raise ConfigError(f"{key}.domains: unknown domain '{d}'{did_you_mean(d, available)}; "
                                  f"valid: {choices_text(available)}")
    wanted = set(domains)
    rows = sorted(r for d, idx in by_domain.items() if d in wanted for r in idx.tolist())
    return ds if len(rows) == len(ds) else ds.select(rows)
