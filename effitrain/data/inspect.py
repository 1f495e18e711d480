"""Read local data files the way the ``local`` dataset will, and refuse bad ones with one line naming the file, the
line and what would be valid -- without ``datasets``, torch or DeepSpeed, so ``effitrain check`` can do it.

Two depths:

* ``deep=False`` (the training pre-flight, every launch): the files exist, are files, are not empty, and a parquet
  file has parquet's magic bytes.  Costs a ``stat`` and a few bytes per file.  Data of at most
  :data:`SMALL_BYTES` is read through anyway (the deep checks), so a bad small file is refused before Hydra or
  DeepSpeed start.
* ``deep=True`` (``effitrain check``, and the ``local`` builder when ``datasets`` refuses a file, to say why): every
  record is read: UTF-8, valid JSON per line (with its line number), an object per line, the text field present and
  a string, the domain field present, enough documents per domain for the eval hold-out, and (for the trained BPE)
  enough text for one global batch.  It reads the whole data once, at about the speed ``json.loads`` parses it.

Rows whose text is an empty or blank string are dropped by the builder (as they always were) and counted here;
rows that lack the text field, or hold something else than a string in it, are refused.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator, Optional, Sequence

from effitrain.registry import ConfigError, choices_text, did_you_mean

SMALL_BYTES = 16 * 2**20  # local data up to this size is always read through (about a second of CPU at most)
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_UNREADABLE_COMPRESSION = (".zst", ".lz4")  # need extra packages: only the shallow checks apply
PARQUET_MAGIC = b"PAR1"


@dataclass
class Inventory:
    """What the deep read found in a split's files."""
    records: int = 0                      # rows (JSON records, parquet rows, text paragraphs)
    documents: int = 0                    # rows with a non-blank text: what the builder keeps
    blank_text: int = 0                   # rows with an empty or blank text (dropped by the builder)
    domains: Counter = field(default_factory=Counter)  # documents per domain
    # UTF-8 bytes + 1 per document: a byte-level BPE gives at most this many tokens (its EOS included)
    domain_tokens_max: Counter = field(default_factory=Counter)
    fields: set = field(default_factory=set)


def short_path(path: str) -> str:
    """The path as the user most likely wrote it: relative when under the working directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def _inner_ext(path: str) -> tuple[str, Optional[str]]:
    name = path.lower()
    for comp in (*_OPENERS, *_UNREADABLE_COMPRESSION):
        if name.endswith(comp):
            return os.path.splitext(name[: -len(comp)])[1], comp
    return os.path.splitext(name)[1], None


def check_file_shallow(path: str, fmt: str, key: str) -> None:
    """Cheap checks of one resolved file: readable, not empty, parquet magic."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ConfigError(f"{key}: '{short_path(path)}' is empty (0 bytes); give a file with documents")
        if fmt == "parquet" and _inner_ext(path)[1] is None:
            with open(path, "rb") as fh:
                head = fh.read(4)
                fh.seek(max(0, size - 4))
                tail = fh.read(4)
            if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
                raise ConfigError(f"{key}: '{short_path(path)}' is not a parquet file (no 'PAR1' magic bytes); "
                                  f"give a .parquet written by pyarrow/pandas, or rename it to its real format "
                                  f"(.jsonl, .json, .txt)")
        elif _inner_ext(path)[1] is None:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise ConfigError(f"{key}: '{short_path(path)}' cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: '{short_path(path)}' is a directory; give the files in it, e.g. "
                          f"'{short_path(path)}/*.jsonl'") from None


def _open_binary(path: str) -> Optional[IO[bytes]]:
    comp = _inner_ext(path)[1]
    if comp in _UNREADABLE_COMPRESSION:
        return None
    return _OPENERS[comp](path, "rb") if comp else open(path, "rb")


def utf8_lines(path: str, key: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a text file, refusing bytes that are not UTF-8 with their position."""
    fh = _open_binary(path)
    if fh is None:
        return
    try:
        with fh:
            for number, raw in enumerate(fh, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as `datasets` allows
                    raw = raw[3:]
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ConfigError(f"{key}: '{short_path(path)}' line {number} is not UTF-8 (byte "
                                      f"0x{raw[exc.start]:02x} at column {exc.start + 1}); re-encode the file as "
                                      f"UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{key}: cannot read '{short_path(path)}': {exc}") from None


class _Rows:
    """Accumulates the checks of the text/domain fields over the records of a split."""

    def __init__(self, key: str, text_field: str, domain_field: Optional[str], path_key: str) -> None:
        self.key, self.text_field, self.domain_field, self.path_key = key, text_field, domain_field, path_key
        self.inv = Inventory()
        self.missing_text: list[str] = []     # "file line N" of rows without the text field (or null)
        self.missing_domain: list[str] = []

    def add(self, record: dict, where: str) -> None:
        inv = self.inv
        inv.records += 1
        inv.fields.update(record)
        text = record.get(self.text_field)
        if text is None:
            self.missing_text.append(where)
            return
        if not isinstance(text, str):
            raise ConfigError(f"{self.key}.text_field: '{self.text_field}' at {where} holds "
                              f"{type(text).__name__} {_clip(text)}, not a string")
        domain = "all"
        if self.domain_field is not None:
            value = record.get(self.domain_field)
            if value is None:
                self.missing_domain.append(where)
                return
            domain = str(value)
        if not text.strip():
            inv.blank_text += 1
            return
        inv.documents += 1
        inv.domains[domain] += 1
        inv.domain_tokens_max[domain] += len(text.encode("utf-8")) + 1

    def finish(self, files: Sequence[str]) -> Inventory:
        inv = self.inv
        what = f"'{short_path(files[0])}'" if len(files) == 1 else f"{len(files)} files"
        if inv.records == 0:
            raise ConfigError(f"{self.path_key}: {what} holds no records (only blank lines); give a file with one "
                              f"document per line")
        if self.missing_text:
            if len(self.missing_text) == inv.records:
                fields = sorted(inv.fields)
                raise ConfigError(f"{self.key}.text_field: column '{self.text_field}' not found in {what}"
                                  f"{did_you_mean(self.text_field, fields)}; columns: "
                                  f"{choices_text(fields) or 'none'}; set {self.key}.text_field to the one that "
                                  f"holds the text")
            raise ConfigError(f"{self.key}.text_field: {len(self.missing_text)} of {inv.records} rows have no "
                              f"'{self.text_field}' (first: {self.missing_text[0]}); fix or remove those rows "
                              f"(they are not dropped silently)")
        if self.missing_domain and len(self.missing_domain) == inv.records:
            fields = sorted(inv.fields)
            raise ConfigError(f"{self.key}.domain_field: column '{self.domain_field}' not found in {what}"
                              f"{did_you_mean(self.domain_field, fields)}; columns: {choices_text(fields)}; or "
                              f"set {self.key}.domain_field=null for one domain 'all'")
        if self.missing_domain:
            raise ConfigError(f"{self.key}.domain_field: {len(self.missing_domain)} of {inv.records} rows have no "
                              f"'{self.domain_field}' (first: {self.missing_domain[0]}); fix those rows or "
                              f"set dataset.domain_field=null for one domain 'all'")
        if inv.documents == 0:
            raise ConfigError(f"{self.path_key}: {what} has no documents with text ({inv.records} rows, all with an "
                              f"empty '{self.text_field}')")
        return inv


def _clip(value: object, n: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def json_line_records(path: str, key: str, text_field: str) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` of a JSON-lines file; blank lines are skipped (as `datasets`' JSON reader skips
    them), and a line that is not one JSON object is refused naming the file and line.  The up-front check and the
    sharded engine's tasks both read through it, so they refuse the same lines with the same words."""
    for number, line in utf8_lines(path, key):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: '{short_path(path)}' line {number} is not valid JSON ({exc.msg} at column "
                              f"{exc.colno}); every line must be one JSON object") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{key}: '{short_path(path)}' line {number} is a JSON {type(record).__name__}, not an "
                              f"object like {{\"{text_field}\": \"...\"}}")
        yield number, record


def _read_json_lines(path: str, rows: _Rows, key: str) -> None:
    for number, record in json_line_records(path, key, rows.text_field):
        rows.add(record, f"'{short_path(path)}' line {number}")


def _first_char(path: str) -> str:
    fh = _open_binary(path)
    if fh is None:
        return ""
    with fh:
        head = fh.read(4096)
    return head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")[:1]


def _read_json(path: str, rows: _Rows, key: str) -> None:
    """A ``.json`` file: a JSON array of objects, or JSON lines (what ``datasets``' json builder reads)."""
    if _first_char(path) != "[":
        _read_json_lines(path, rows, key)
        return
    text = "".join(line for _, line in utf8_lines(path, key))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: '{short_path(path)}' is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                          f"{exc.colno})") from None
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ConfigError(f"{key}: '{short_path(path)}' record {i} is a JSON {type(record).__name__}, not an "
                              f"object")
        rows.add(record, f"'{short_path(path)}' record {i}")


def _read_text(path: str, rows: _Rows, key: str, txt_split: str = "blank_line") -> None:
    """Plain text, cut into documents as the builder cuts it (``dataset.txt_split``): at blank lines
    (``sample_by='paragraph'``), at every line, or one document per file."""
    if txt_split != "blank_line":
        lines = list(utf8_lines(path, key))
        if txt_split == "file":
            rows.add({"text": "".join(line for _, line in lines)}, f"'{short_path(path)}'")
        else:
            for number, line in lines:
                rows.add({"text": line.rstrip("\n")}, f"'{short_path(path)}' line {number}")
        return
    start, buf = 0, []
    for number, line in utf8_lines(path, key):
        if line.strip():
            if not buf:
                start = number
            buf.append(line)
        elif buf:
            rows.add({"text": "".join(buf)}, f"'{short_path(path)}' line {start}")
            buf = []
    if buf:
        rows.add({"text": "".join(buf)}, f"'{short_path(path)}' line {start}")


def _read_parquet(path: str, rows: _Rows, key: str) -> None:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged file are many
        raise ConfigError(f"{key}: '{short_path(path)}' is not a readable parquet file: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    import pyarrow as pa

    if rows.text_field in names:
        tp = pf.schema_arrow.field(rows.text_field).type
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
            raise ConfigError(f"{rows.key}.text_field: column '{rows.text_field}' of '{short_path(path)}' holds {tp}, "
                              f"not strings")
    columns = [c for c in (rows.text_field, rows.domain_field) if c and c in names]
    offset = 0
    try:
        for batch in pf.iter_batches(columns=columns or None, batch_size=65536):
            data = batch.to_pydict() if columns else {}
            for i in range(batch.num_rows):
                record = {c: data[c][i] for c in columns}
                if not columns:
                    record = {n: None for n in names}
                rows.add(record, f"'{short_path(path)}' row {offset + i + 1}")
            offset += batch.num_rows
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{key}: cannot read '{short_path(path)}' as parquet: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    rows.inv.fields.update(names)


_READERS = {"parquet": _read_parquet, "text": _read_text}  # json: by extension, below


def inspect_files(files: Sequence[str], fmt: str, *, key: str, text_field: str, domain_field: Optional[str],
                  deep: bool, txt_split: str = "blank_line") -> Optional[Inventory]:
    """Check resolved ``files`` of one split; with ``deep`` read every record and return what was found."""
    for f in files:
        check_file_shallow(f, fmt, key)
    if not deep:
        return None
    if fmt == "text":
        text_field, domain_field = "text", None
    rows = _Rows(key.rsplit(".", 1)[0], text_field, domain_field, key)  # field errors name dataset.text_field
    for f in files:
        if _inner_ext(f)[1] in _UNREADABLE_COMPRESSION:
            return None  # cannot look inside without extra packages; the builder will
        if fmt == "json":
            (_read_json_lines if _inner_ext(f)[0] == ".jsonl" else _read_json)(f, rows, key)
        elif fmt == "text":
            _read_text(f, rows, key, txt_split)
        else:
            _READERS[fmt](f, rows, key)
    return rows.finish(files)


def check_local(params, *, deep: bool, key: str = "dataset") -> Optional[Inventory]:
    """All input checks of a ``dataset=local`` block (see the module docstring for what each depth covers)."""
    from effitrain.data import sources

    train_files = sources.resolve_files(params.path, f"{key}.path")
    fmt = sources.file_format(train_files, f"{key}.path")
    deep = deep or sum(os.path.getsize(f) for f in train_files) <= SMALL_BYTES
    text_field = "text" if fmt == "text" else params.text_field
    domain_field = None if fmt == "text" else params.domain_field
    inv = inspect_files(train_files, fmt, key=f"{key}.path", text_field=text_field, domain_field=domain_field,
                        deep=deep, txt_split=params.txt_split)
    eval_inv = None
    if params.eval_path:
        eval_files = sources.resolve_files(params.eval_path, f"{key}.eval_path")
        eval_fmt = sources.file_format(eval_files, f"{key}.eval_path")
        eval_inv = inspect_files(eval_files, eval_fmt, key=f"{key}.eval_path",
                                 text_field="text" if eval_fmt == "text" else params.text_field,
                                 domain_field=None if eval_fmt == "text" else params.domain_field, deep=deep,
                                 txt_split=params.txt_split)
    if inv is None:
        return
    domains = dict(inv.domains)
    if params.domains is not None:
        for d in params.domains:
            if d not in domains:
                raise ConfigError(f"{key}.domains: unknown domain '{d}'{did_you_mean(d, domains)}; "
                                  f"valid: {choices_text(domains)}")
        domains = {d: n for d, n in domains.items() if d in set(params.domains)}
    if params.eval_path:
        if eval_inv is not None and params.domains is not None and \
                not any(d in eval_inv.domains for d in params.domains):
            raise ConfigError(f"{key}.eval_path: no eval document is in the domains {choices_text(params.domains)}")
        return inv
    need = params.eval_examples_per_domain
    for domain, n in sorted(domains.items()):
        if n <= need:
            raise ConfigError(f"{key}.eval_examples_per_domain: domain '{domain}' has only {n} documents, not "
                              f"enough to hold out {need} for evaluation and train on the rest; lower "
                              f"{key}.eval_examples_per_domain below {n} or give {key}.eval_path")
    return inv


def check_enough_for_a_batch(inv: Inventory, *, seq_len: int, global_batch: int, domains, key: str) -> None:
    """Refuse data that cannot fill one global batch of packed rows even at one token per byte (a byte-level BPE
    never does worse), before any tokenizer is trained: packing keeps only full rows, per domain."""
    rows = sum(n // seq_len for d, n in inv.domain_tokens_max.items() if domains is None or d in set(domains))
    if rows < global_batch:
        raise ConfigError(f"{key}: the training data holds at most {rows} packed sequences of {seq_len} tokens "
                          f"(one token per byte at best), fewer than one global batch of {global_batch}; give more "
                          f"data or lower {key}.seq_len or train.micro_batch_size")
