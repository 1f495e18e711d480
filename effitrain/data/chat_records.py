"""Chat records (conversations, preference pairs, prompts) read and checked the way the chat datasets use them,
without torch or ``datasets``, so that ``effitrain check`` and the launch pre-flight refuse a bad file with the same
one line as the builder (``dataset=chat_local``: :mod:`effitrain.data.chat_sources`).

A record is ``{id, domain, messages, rejected}``.  What is refused, and how:

* at the first occurrence, naming the file and line: bytes that are not UTF-8, a line that is not JSON or not a JSON
  object, a missing ``messages`` (or ``chosen`` / ``rejected``) field, a malformed message, a pair whose two sides
  do not share their prompt;
* with a count and the first occurrence (so one look at the message says whether a few rows or the whole export is
  broken): rows without the domain field, assistant messages with an empty content (training on them teaches the
  model to answer with nothing; in ``format: prompts`` an empty reference answer is allowed, see
  :func:`check_references`), preference pairs whose chosen and rejected conversations are the same (DPO's loss has
  no gradient on them; they would only dilute the batch).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from effitrain.registry import ConfigError, choices_text, did_you_mean

ROLES = ("system", "user", "assistant")
DEFAULT_DOMAIN = "all"


def check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    """``messages`` as a list of {role, content} dicts, or a ConfigError naming ``key`` and what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(f"{key}: expected a non-empty list of {{role, content}} messages, got "
                          f"{_json_type(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{key}[{i}]: a message needs 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{key}[{i}].role: '{m['role']}' is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{key}[{i}].content: expected a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ConfigError(f"{key}: the conversation has no assistant message, so nothing would be trained")
    return out


def first_assistant_split(messages: Sequence[dict], key: str) -> tuple[list[dict], list[dict]]:
    """(prompt messages, the rest) at the first assistant message."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return list(messages[:i]), list(messages[i:])
    raise ConfigError(f"{key}: the conversation has no assistant message")


def shared_prompt(chosen: Sequence[dict], rejected: Sequence[dict], key: str) -> Optional[list[dict]]:
    """The prompt of a preference pair; a ConfigError when the two conversations do not start alike."""
    p_chosen, _ = first_assistant_split(chosen, f"{key}.chosen")
    p_rejected, _ = first_assistant_split(rejected, f"{key}.rejected")
    if p_chosen != p_rejected:
        raise ConfigError(f"{key}: chosen and rejected must share their prompt (the messages before the first "
                          f"assistant message)")
    return p_chosen


def _empty_answer(messages: Sequence[dict]) -> Optional[int]:
    """The index of the first assistant message whose content is empty or blank, or None."""
    return next((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()), None)


@dataclass
class _Counted:
    """Rows with one problem: how many, and where the first one is."""
    count: int = 0
    first: str = ""

    def add(self, where: str) -> None:
        self.count += 1
        self.first = self.first or where


@dataclass
class ChatInventory:
    """What reading a split's records found."""
    records: int = 0
    domains: Counter = field(default_factory=Counter)   # records per domain
    fields: set = field(default_factory=set)
    empty_references: _Counted = field(default_factory=_Counted)  # format prompts: first answers that are empty


class ChatRecords:
    """Turns source rows into checked records (:meth:`add`), counting the problems that are refused with a count
    (:meth:`finish`).  ``params`` is a chat dataset block's params (``format``, the field names)."""

    def __init__(self, params: Any, key: str) -> None:
        self.params, self.key = params, key
        self.inv = ChatInventory()
        self.no_domain = _Counted()
        self.empty_answer = _Counted()
        self.identical_pair = _Counted()

    def _field(self, row: dict, name: str, param: str, where: str) -> Any:
        if name not in row:
            raise ConfigError(f"{where}: no '{name}'{did_you_mean(name, list(row))}; fields: "
                              f"{choices_text(sorted(row)) or 'none'} ({self.key.rsplit('.', 1)[0]}.{param} names "
                              f"the list of {{role, content}} messages)")
        return row[name]

    def add(self, row: Any, where: str, default_id: str) -> dict:
        """One source row as a record ``{id, domain, messages, rejected}``; ``where`` is its place ("'f.jsonl' line
        4", "row 5"), which the errors name after the config key."""
        if not isinstance(row, dict):
            raise ConfigError(f"{self.key}: {where} is a JSON {_json_type(row)}, not an object like "
                              f"{{\"{self._main_field()}\": [{{\"role\": \"user\", \"content\": \"...\"}}, ...]}}")
        self.inv.records += 1
        self.inv.fields.update(row)
        if self.params.format == "preference":
            messages, rejected = self._pair(row, where)
        else:
            messages, rejected = self._conversation(row, where), None
        return {"id": str(row["id"]) if row.get("id") is not None else default_id,
                "domain": self._domain(row, where), "messages": messages, "rejected": rejected}

    def _pair(self, row: dict, where: str) -> tuple[list[dict], list[dict]]:
        p, at = self.params, f"{self.key} ({where})"
        chosen = check_messages(self._field(row, p.chosen_field, "chosen_field", at), f"{at}.{p.chosen_field}")
        rejected = check_messages(self._field(row, p.rejected_field, "rejected_field", at), f"{at}.{p.rejected_field}")
        shared_prompt(chosen, rejected, at)
        if chosen == rejected:
            self.identical_pair.add(where)
        for side, conversation in ((p.chosen_field, chosen), (p.rejected_field, rejected)):
            empty = _empty_answer(conversation)
            if empty is not None:
                self.empty_answer.add(f"{where}, {side}[{empty}]")
                break
        return chosen, rejected

    def _conversation(self, row: dict, where: str) -> list[dict]:
        p, at = self.params, f"{self.key} ({where})"
        messages = check_messages(self._field(row, p.messages_field, "messages_field", at), f"{at}.{p.messages_field}")
        if p.format == "prompts":
            # a prompt keeps only its first answer, the reference that rewards compare with (some rewards need none)
            if not messages[_first_answer(messages)]["content"].strip():
                self.inv.empty_references.add(where)
            return messages
        empty = _empty_answer(messages)
        if empty is not None:
            self.empty_answer.add(f"{where}, {p.messages_field}[{empty}]")
        return messages

    def _domain(self, row: dict, where: str) -> str:
        domain = DEFAULT_DOMAIN
        if self.params.domain_field:
            value = row.get(self.params.domain_field)
            if value is None:
                self.no_domain.add(where)
            else:
                domain = str(value)
        self.inv.domains[domain] += 1
        return domain

    def _main_field(self) -> str:
        return self.params.chosen_field if self.params.format == "preference" else self.params.messages_field

    def finish(self, what: str) -> ChatInventory:
        """The inventory, or a ConfigError for the problems counted over the rows (``what``: the files, for the
        message)."""
        inv, key, base = self.inv, self.key, self.key.rsplit(".", 1)[0]
        if inv.records == 0:
            raise ConfigError(f"{key}: {what} holds no conversations; give one JSON object per line with a "
                              f"'{self._main_field()}' list")
        if self.no_domain.count:
            field_name = self.params.domain_field
            if self.no_domain.count == inv.records:
                fields = sorted(inv.fields)
                raise ConfigError(f"{base}.domain_field: field '{field_name}' not found in {what}"
                                  f"{did_you_mean(field_name, fields)}; fields: {choices_text(fields)}; or set "
                                  f"{base}.domain_field=null for one domain 'all'")
            raise ConfigError(f"{base}.domain_field: {self.no_domain.count} of {inv.records} rows have no "
                              f"'{field_name}' (first: {self.no_domain.first}); fix those rows or set "
                              f"{base}.domain_field=null for one domain 'all'")
        if self.empty_answer.count:
            rows = "preference pairs" if self.params.format == "preference" else "conversations"
            raise ConfigError(f"{key}: {self.empty_answer.count} of {inv.records} {rows} have an empty "
                              f"assistant message (first: {self.empty_answer.first}); training on it teaches the "
                              f"model to answer with nothing; fix or remove those rows")
        if self.identical_pair.count:
            raise ConfigError(f"{key}: {self.identical_pair.count} of {inv.records} preference pairs have the same "
                              f"chosen and rejected conversation (first: {self.identical_pair.first}); a pair "
                              f"teaches a preference only when its answers differ; fix or remove those rows")
        return inv


def _first_answer(messages: Sequence[dict]) -> Optional[int]:
    return next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)


def _json_type(value: Any) -> str:
    return {list: "list", int: "number", float: "number", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_jsonl(files: Sequence[str], records: ChatRecords) -> Iterator[dict]:
    """The records of chat JSONL ``files``, in order (refusals name the file and line; see the module docstring)."""
    from effitrain.data.inspect import short_path, utf8_lines

    for f in files:
        for n, line in utf8_lines(f, records.key):
            if not line.strip():
                continue
            where = f"'{short_path(f)}' line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{records.key}: {where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                  f"every line must be one JSON object") from None
            yield records.add(row, where, f"{Path(f).stem}-{n:09d}")


def describe(files: Sequence[str]) -> str:
    from effitrain.data.inspect import short_path

    return f"'{short_path(files[0])}'" if len(files) == 1 else f"{len(files)} files"


def check_references(inv: ChatInventory, spec: Any, key: str) -> None:
    """``format: prompts``: a prompt's first assistant message is the reference answer that rewards such as
    ``exact_answer`` compare with; with such a reward, an empty reference can never be matched (its prompt's samples
    all get the same reward, so it contributes no gradient).  Reference-free rewards (format, length) need none."""
    empty = inv.empty_references
    if not empty.count:
        return
    objective = spec.block("objective")
    readers = [b.name for b in getattr(objective.params, "reward_blocks", []) if getattr(b.params, "reads_reference",
                                                                                         False)]
    if not readers:
        return
    share = "all" if empty.count == inv.records else f"{empty.count} of {inv.records}"
    raise ConfigError(f"{key}: {share} prompts have an empty reference answer (first: {empty.first}), which the "
                      f"reward {readers[0]} compares with and can never match; give every prompt its answer, or use "
                      f"only rewards that need none (format, length)")


def check_chat_local(params: Any, *, spec: Any, deep: bool, key: str = "dataset") -> Optional[ChatInventory]:
    """All input checks of a ``dataset=chat_local`` block: the files exist and are not empty; with ``deep`` (or when
    they are small, :data:`effitrain.data.inspect.SMALL_BYTES`) every record is read as the builder reads it, and the
    hold-out and the prompts' references are checked.  Returns the training split's inventory when it was read."""
    import os

    from effitrain.data import sources
    from effitrain.data.inspect import SMALL_BYTES, check_file_shallow

    splits = {"path": sources.resolve_files(params.path, f"{key}.path")}
    if params.eval_path:
        splits["eval_path"] = sources.resolve_files(params.eval_path, f"{key}.eval_path")
    for name, files in splits.items():
        for f in files:
            check_file_shallow(f, "json", f"{key}.{name}")
    if not deep and sum(os.path.getsize(f) for files in splits.values() for f in files) > SMALL_BYTES:
        return None
    found = {}
    for name, files in splits.items():
        reader = ChatRecords(params, f"{key}.{name}")
        for _ in read_jsonl(files, reader):
            pass
        found[name] = reader.finish(describe(files))
    inv = found["path"]
    if params.format == "prompts":
        check_references(inv, spec, f"{key}.path")
    if not params.eval_path:
        need = params.eval_examples_per_domain
        for domain, n in sorted(inv.domains.items()):
            if n <= need:
                raise ConfigError(f"{key}.eval_examples_per_domain: domain '{domain}' has only {n} conversations, not "
                                  f"enough to hold out {need} for evaluation and train on the rest; lower "
                                  f"{key}.eval_examples_per_domain below {n} or give {key}.eval_path")
    return inv
