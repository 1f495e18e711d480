"""Stream the records of one local data file (JSON lines, optionally compressed, or parquet) as documents.

The sharded data engine (:mod:`effitrain.data.engine`) reads a corpus a file at a time in many processes, so it
cannot go through ``datasets.load_dataset`` (which loads a split whole).  This reader yields, for every record, what
the in-memory ``local`` builder keeps of it (:func:`effitrain.data.sources.standardize`): its position among the
file's records (blank-text records included, as the builder counts them for its ``train-<row>`` ids), the text, the
domain and the record's own ``id`` if it has one.  Records without text are dropped, as the builder drops them; a
malformed line or a missing text field is refused with one line naming the file and the line, never skipped.

datatrove's own readers are not used for this: its JSONL reader skips a line that is not JSON with a warning, and its
parquet reader numbers only the records that have text -- both would make the sharded corpus differ silently from
the in-memory one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from effitrain.data.inspect import json_line_records, short_path
from effitrain.data.sources import DEFAULT_DOMAIN
from effitrain.registry import ConfigError

ID_FIELD = "id"  # the column the in-memory builder keeps as the document id when the source has it


@dataclass(frozen=True)
class Record:
    index: int              # position among the file's records (JSON lines / parquet rows), from 0
    text: str
    domain: str
    doc_id: Optional[str]   # the record's own id, or None (the builder then numbers it)


class RecordFile:
    """The documents of ``path`` (``fmt``: ``json`` or ``parquet``) in file order, blank texts skipped; after a full
    iteration ``records`` is the number of records the file holds (blank ones included)."""

    def __init__(self, path: str, fmt: str, *, text_field: str, domain_field: Optional[str],
                 key: str = "dataset.path") -> None:
        self.path, self.fmt, self.text_field, self.domain_field, self.key = path, fmt, text_field, domain_field, key
        self.records = 0

    def __iter__(self) -> Iterator[Record]:
        reader = _json_records if self.fmt == "json" else _parquet_records
        text_field, domain_field, block = self.text_field, self.domain_field, self.key.rsplit(".", 1)[0]
        self.records = 0
        for index, record, where in reader(self.path, text_field, domain_field, self.key):
            self.records = index + 1
            text = record.get(text_field)
            if text is None:
                raise ConfigError(f"{block}.text_field: {where} has no '{text_field}'; fix or remove that row (rows "
                                  f"are not dropped silently)")
            if not isinstance(text, str):
                raise ConfigError(f"{block}.text_field: '{text_field}' at {where} holds {type(text).__name__}, not "
                                  f"a string")
            domain = DEFAULT_DOMAIN
            if domain_field is not None:
                value = record.get(domain_field)
                if value is None:
                    raise ConfigError(f"{block}.domain_field: {where} has no '{domain_field}'; fix that row or set "
                                      f"dataset.domain_field=null for one domain 'all'")
                domain = str(value)
            if not text.strip():  # the builder drops blank documents (they would be bare end-of-text tokens)
                continue
            raw_id = record.get(ID_FIELD)
            yield Record(index, text, domain, None if raw_id is None else str(raw_id))


def _json_records(path: str, text_field: str, domain_field: Optional[str], key: str):
    for index, (number, record) in enumerate(json_line_records(path, key, text_field)):
        yield index, record, f"'{short_path(path)}' line {number}"


def _parquet_records(path: str, text_field: str, domain_field: Optional[str], key: str):
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged file are many
        raise ConfigError(f"{key}: '{short_path(path)}' is not a readable parquet file: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if text_field not in names:
        raise ConfigError(f"{key.rsplit('.', 1)[0]}.text_field: column '{text_field}' not found in "
                          f"'{short_path(path)}'; columns: {', '.join(names)}")
    columns = [c for c in (text_field, domain_field, ID_FIELD) if c is not None and c in names]
    index = 0
    for batch in pf.iter_batches(columns=columns, batch_size=8192):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            yield index, {c: data[c][i] for c in columns}, f"'{short_path(path)}' row {index + 1}"
            index += 1
