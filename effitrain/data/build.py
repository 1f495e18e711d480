"""The registered dataset builders (``dataset.name: demo | local | hub``).

Each is called as ``build(params, *, cache_dir=None)`` and returns a ``datasets.DatasetDict`` with ``train`` and
``eval`` splits whose columns are exactly ``id``, ``text`` and ``domain`` (strings).  ``cache_dir`` is the root of
effitrain's caches (default ``$EFFITRAIN_CACHE`` or ``~/.cache/effitrain``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from effitrain.registry import ConfigError, choices_text, did_you_mean
from effitrain.data import sources

_KEY = "dataset"


def build_demo(params: Any, *, cache_dir: Optional[str | Path] = None):
    """The built-in demo corpus (see :mod:`effitrain.data.demo`), cached after the first build.

    ``max_docs_per_domain`` caps every domain's train documents; ``eval_examples_per_domain`` more documents per
    domain form the eval split (from other files/topics than the train documents).
    """
    from effitrain.data.demo import DEMO_DOMAINS, load_demo

    if params.domains is not None:
        for d in params.domains:
            if d not in DEMO_DOMAINS:
                raise ConfigError(f"{_KEY}.domains: unknown domain '{d}'{did_you_mean(d, DEMO_DOMAINS)}; "
                                  f"valid: {choices_text(DEMO_DOMAINS)}")
    # Only the requested domains are built: the docstrings domain alone costs seconds of parsing.
    return load_demo(params.max_docs_per_domain, params.eval_examples_per_domain, params.seed,
                     domains=params.domains, cache_root=cache_dir)


def _hf_cache(cache_dir: Optional[str | Path]) -> str:
    from effitrain.data.cache import cache_root

    return str(cache_root(cache_dir) / "hf_datasets")


# dataset.txt_split -> the `datasets` text builder's sample_by
_TXT_SAMPLE_BY = {"blank_line": "paragraph", "line": "line", "file": "document"}


def _load_files(files: list[str], key: str, cache_dir: Optional[str | Path], *, text_field: str = "text",
                domain_field: Optional[str] = None, txt_split: str = "blank_line"):
    import datasets

    from effitrain.data.inspect import SMALL_BYTES, inspect_files

    fmt = sources.file_format(files, key)
    # Small inputs are read record by record first (milliseconds), so a bad file is named with its line before
    # `datasets` logs its own wording; big ones only when `datasets` refuses them (below).
    small = sum(os.path.getsize(f) for f in files) <= SMALL_BYTES
    inspect_files(files, fmt, key=key, text_field="text" if fmt == "text" else text_field,
                  domain_field=None if fmt == "text" else domain_field, deep=small, txt_split=txt_split)
    # Plain text has no record structure: `dataset.txt_split` says what a document is.  The default, a blank line
    # between documents, is the most common convention (one document per line would cut hard-wrapped prose into
    # fragments, each followed by an end-of-text token).
    extra = {"sample_by": _TXT_SAMPLE_BY[txt_split]} if fmt == "text" else {}
    try:
        return fmt, datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=_hf_cache(cache_dir),
                                          **extra)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - malformed json, a parquet that is not one, no records, bad bytes...
        # `datasets` words these vaguely ("An error occurred while generating the dataset", a bare StopIteration):
        # read the files ourselves to name the file and line; fall back to its own message.
        inspect_files(files, fmt, key=key, text_field="text" if fmt == "text" else text_field,
                      domain_field=None if fmt == "text" else domain_field, deep=True, txt_split=txt_split)
        cause = exc.__cause__ or exc.__context__ or exc
        message = str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{key}: cannot read {files[0] if len(files) == 1 else f'{len(files)} files'} "
                          f"as {fmt}: {message}") from None


def build_local(params: Any, *, cache_dir: Optional[str | Path] = None):
    """Local jsonl / json / parquet / txt files (one format per split; globs allowed).

    Text files are cut into documents by ``txt_split`` (blank lines, lines, or one per file) and always use the
    column ``text``.  Without ``eval_path``,
    ``eval_examples_per_domain`` documents of every domain are held out of the train files (chosen by a hash of
    their ids, so the same in every run).
    """
    import datasets

    train_files = sources.resolve_files(params.path, f"{_KEY}.path")
    fmt, train = _load_files(train_files, f"{_KEY}.path", cache_dir, text_field=params.text_field,
                             domain_field=params.domain_field, txt_split=params.txt_split)
    text_field = "text" if fmt == "text" else params.text_field
    domain_field = None if fmt == "text" else params.domain_field
    train = sources.standardize(train, text_field=text_field, domain_field=domain_field, key=_KEY,
                                id_prefix="train", num_proc=params.num_proc)
    # Filter before holding out, so a tiny domain the user excluded cannot make the hold-out fail.
    train = sources.filter_domains(_nonempty(train, "train"), params.domains, _KEY)
    if params.eval_path:
        eval_files = sources.resolve_files(params.eval_path, f"{_KEY}.eval_path")
        eval_fmt, eval_ = _load_files(eval_files, f"{_KEY}.eval_path", cache_dir, text_field=params.text_field,
                                      domain_field=params.domain_field, txt_split=params.txt_split)
        eval_ = sources.standardize(eval_, text_field="text" if eval_fmt == "text" else params.text_field,
                                    domain_field=None if eval_fmt == "text" else params.domain_field, key=_KEY,
                                    id_prefix="eval", num_proc=params.num_proc)
        eval_ = sources.filter_domains(eval_, params.domains, _KEY, strict=False)
        eval_ = sources.cap_per_domain(_nonempty(eval_, "eval"), params.eval_examples_per_domain)
    else:
        train, eval_ = sources.hold_out(train, params.eval_examples_per_domain, _KEY)
    return datasets.DatasetDict({"train": train, "eval": eval_})


def build_hub(params: Any, *, cache_dir: Optional[str | Path] = None):
    """A dataset from the Hugging Face hub by id (``path``, ``config_name``, ``split``, ``revision``).

    Downloads go to the ordinary Hugging Face cache (``HF_DATASETS_CACHE``), not effitrain's, so a cache warmed by
    other tools is found, and ``HF_DATASETS_OFFLINE=1`` runs from it without network.  ``eval_split`` names the
    source's own eval split (capped at ``eval_examples_per_domain`` per domain); without it documents are held out
    of ``split``.
    """
    import datasets

    def load(split: str, key: str):
        try:
            return datasets.load_dataset(params.path, params.config_name, split=split, revision=params.revision)
        except ConnectionError as exc:  # offline (HF_DATASETS_OFFLINE) or no network, and not in the cache
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{_KEY}.path: cannot reach '{params.path}' on the Hugging Face hub and it is not in "
                              f"the local cache ({message}); download it where there is network, or use "
                              f"dataset=local dataset.path=FILE") from None
        except (FileNotFoundError, ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{key}: cannot load '{params.path}' (config {params.config_name!r}, split "
                              f"{split!r}): {message}") from None

    train = sources.standardize(load(params.split, f"{_KEY}.split"), text_field=params.text_field,
                                domain_field=params.domain_field, key=_KEY, id_prefix=params.split,
                                num_proc=params.num_proc)
    train = sources.filter_domains(_nonempty(train, "train"), params.domains, _KEY)
    if params.eval_split:
        eval_ = sources.standardize(load(params.eval_split, f"{_KEY}.eval_split"), text_field=params.text_field,
                                    domain_field=params.domain_field, key=_KEY, id_prefix=params.eval_split,
                                    num_proc=params.num_proc)
        eval_ = sources.filter_domains(eval_, params.domains, _KEY, strict=False)
        eval_ = sources.cap_per_domain(_nonempty(eval_, "eval"), params.eval_examples_per_domain)
    else:
        train, eval_ = sources.hold_out(train, params.eval_examples_per_domain, _KEY)
    return datasets.DatasetDict({"train": train, "eval": eval_})


def _nonempty(ds, split: str):
    if len(ds) == 0:
        raise ConfigError(f"{_KEY}: the {split} split has no documents with text")
    return ds
