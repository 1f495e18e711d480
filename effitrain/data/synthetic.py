"""Documents made by a model (a synthesis stage's ``dataset.jsonl``) joined to a run's train split:
``dataset.synthetic: ["@stage:NAME", ...]``.

They join after the tokenizer is trained and never the eval split, so the tokenizer and the per-token eval losses
stay those of the real data (a run with rephrased documents is measured on the same held-out text as one without).
Each row keeps its own ``domain`` (the synthesis stage names it ``<source domain>_<suffix>``), so the mixture
curriculum weighs synthetic against real data (WRAP's 1:1).  A file a synthesis stage wrote is checked against the
sha256 the stage recorded next to it: a later stage never trains on a file changed since.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effitrain.fsutil import sha256_file
from effitrain.registry import ConfigError

DATASET_FILE = "dataset.jsonl"   # what a synthesis stage leaves in its folder ('@stage:NAME' names it)
DATASET_RECORD = "dataset.json"  # beside it: its sha256 and counts


def recorded_sha256(path: Path, key: str) -> str | None:
    """The sha256 a synthesis stage recorded for ``path``, checked against the file; None for another file."""
    record = path.with_name(DATASET_RECORD)
    if path.name != DATASET_FILE or not record.is_file():
        return None
    expected = json.loads(record.read_text()).get("sha256")
    if sha256_file(path) != expected:
        raise ConfigError(f"{key}: {path} changed after its synthesis stage made it (its sha256 is not the one in "
                          f"{record}); run the stage again or restore the file")
    return expected


def read_rows(path: str, key: str) -> list[dict[str, str]]:
    """``id``, ``text``, ``domain`` of every row of a jsonl file of synthetic documents."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: {path} does not exist (a synthesis stage's dataset, '@stage:NAME', exists once "
                          f"that stage finished)")
    recorded_sha256(file, key)
    rows = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{key}: {path}, line {n}: not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConfigError(f"{key}: {path}, line {n}: expected an object with a 'text' string")
            rows.append({"id": f"synthetic:{row.get('id', n)}", "text": row["text"],
                         "domain": str(row.get("domain") or "synthetic")})
    if not rows:
        raise ConfigError(f"{key}: {path} holds no documents")
    return rows


def with_synthetic(train: Any, params: Any) -> Any:
    """``train`` plus the documents of every file in ``params.synthetic``; ``train`` itself when there are none."""
    files = getattr(params, "synthetic", None) or []
    if not files:
        return train
    import datasets

    rows = [r for i, f in enumerate(files) for r in read_rows(f, f"dataset.synthetic[{i}]")]
    columns = train.select_columns(["id", "text", "domain"])
    added = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("id", "text", "domain")})
    return datasets.concatenate_datasets([columns, added.cast(columns.features)])


def file_domains(files: list[str]) -> list[str] | None:
    """The domains of synthetic files that exist now (None if one does not: an earlier stage writes it)."""
    found: set[str] = set()
    for f in files:
        if not Path(f).is_file():
            return None
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        found.add(str(json.loads(line).get("domain") or "synthetic"))
                    except (ValueError, AttributeError):
                        return None
    return sorted(found)
