"""Chat and preference datasets as sources (``dataset.name: chat_demo | chat_local | chat_hub``), and their rows.

A source ends, like every other, as a ``DatasetDict`` with ``train`` and ``eval`` splits and the columns ``id``,
``text`` and ``domain`` (so selection methods and the BPE tokenizer work unchanged), plus ``messages`` (the
conversation as JSON) and ``rejected`` (the rejected conversation as JSON; empty for chat data).  ``text`` is the
conversation rendered with the default chat template: it is what a trained BPE learns from and what text-based
selection methods read.

:func:`build_chat_splits` turns the documents into rows (:mod:`effitrain.data.chat`): packed conversations
``[N, 3, seq_len]`` (``format: chat``), (chosen, rejected) pairs ``[N, 2, 3, seq_len]`` (``format:
preference``) or one conversation a row ``[N, 3, seq_len]`` (``format: prompts``: a prompt and its reference
answer, for sampling),
stored as ``datasets`` columns of ``seq_len`` ints each (``input_ids``, ``labels``, ``position_ids`` and, for pairs,
the same three prefixed ``rejected_``), which :func:`effitrain.data.packing.to_numpy` stacks back.  Evaluation rows
are always packed conversations (of a pair, the chosen one), so the eval loss is the next-token loss on the assistant
tokens of good answers, whatever the objective.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from effitrain.data import chat
from effitrain.data.tokenizer import EOS_TOKEN
from effitrain.registry import ConfigError

_KEY = "dataset"
CHANNEL_COLUMNS = chat.CHANNELS
REJECTED_COLUMNS = tuple(f"rejected_{c}" for c in chat.CHANNELS)


@functools.lru_cache(maxsize=1)
def _default_template():
    """The default chat template compiled once: compiling it per conversation took ~10 ms, most of building the
    4000 built-in conversations."""
    import jinja2

    return jinja2.Environment().from_string(chat.DEFAULT_CHAT_TEMPLATE)


def render_text(messages: list[dict]) -> str:
    """The conversation in the default template with effitrain's EOS (the ``text`` column)."""
    return _default_template().render(messages=messages, eos_token=EOS_TOKEN, add_generation_prompt=False)


def _dataset(records: list[dict]):
    import datasets

    return datasets.Dataset.from_dict({
        "id": [r["id"] for r in records], "text": [render_text(r["messages"]) for r in records],
        "domain": [r["domain"] for r in records], "messages": [json.dumps(r["messages"]) for r in records],
        "rejected": [json.dumps(r["rejected"]) if r.get("rejected") else "" for r in records]})


def build_chat_demo(params: Any, *, cache_dir: Optional[str | Path] = None):
    """The built-in arithmetic instructions (:mod:`effitrain.data.arithmetic_chat`), eval questions held out."""
    import datasets

    from effitrain.data.arithmetic_chat import DOMAIN, splits

    train, eval_ = splits(params.max_docs_per_domain, params.eval_examples_per_domain, seed=params.seed,
                          max_digits=params.max_digits, style=params.answer_style)
    keep_rejected = params.format == "preference"
    records = [[{"id": e["id"], "domain": DOMAIN, "messages": e["messages"],
                 "rejected": e["rejected"] if keep_rejected else None} for e in split] for split in (train, eval_)]
    return datasets.DatasetDict({"train": _dataset(records[0]), "eval": _dataset(records[1])})


def _record(row: dict, params: Any, where: str, default_id: str) -> dict:
    """One source record as ``{id, domain, messages, rejected}``, checked (errors name ``where``)."""
    if params.format == "preference":
        for field in (params.chosen_field, params.rejected_field):
            if field not in row:
                raise ConfigError(f"{where}: no '{field}' (dataset.chosen_field / rejected_field name the chosen "
                                  f"and rejected conversations)")
        messages = chat.check_messages(row[params.chosen_field], f"{where}.{params.chosen_field}")
        rejected = chat.check_messages(row[params.rejected_field], f"{where}.{params.rejected_field}")
        chat.shared_prompt(messages, rejected, where)
    else:
        if params.messages_field not in row:
            raise ConfigError(f"{where}: no '{params.messages_field}' (dataset.messages_field names the list of "
                              f"{{role, content}} messages)")
        messages, rejected = chat.check_messages(row[params.messages_field], f"{where}.{params.messages_field}"), None
    return {"id": str(row["id"]) if row.get("id") is not None else default_id,
            "domain": str(row[params.domain_field]) if params.domain_field else "all",
            "messages": messages, "rejected": rejected}


def _read_jsonl(files: list[str], params: Any, key: str) -> list[dict]:
    records = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{key} ({f}, line {n})"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}: not JSON: {exc.msg}") from None
                records.append(_record(row, params, where, f"{Path(f).stem}-{n:09d}"))
    if not records:
        raise ConfigError(f"{key}: no conversations in {', '.join(files)}")
    return records


def build_chat_hub(params: Any, *, cache_dir: Optional[str | Path] = None):
    """Conversations from a Hugging Face dataset (a hub id, or a local dataset folder): ``split`` for training,
    ``eval_split`` (or a hold-out of ``split``) for evaluation.  Hub downloads go to the ordinary Hugging Face cache,
    so ``HF_DATASETS_OFFLINE=1`` runs from it."""
    import datasets

    from effitrain.data import sources

    def load(split: str, key: str) -> list[dict]:
        try:
            ds = datasets.load_dataset(params.path, params.config_name, split=split, revision=params.revision)
        except ConnectionError as exc:
            raise ConfigError(f"{_KEY}.path: cannot reach '{params.path}' on the Hugging Face hub and it is not in "
                              f"the local cache ({str(exc).splitlines()[0] if str(exc) else 'offline'})") from None
        except (FileNotFoundError, ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{key}: cannot load '{params.path}' split {split!r}: {message}") from None
        return [_record(row, params, f"{key} (row {i + 1})", f"{split}-{i:09d}") for i, row in enumerate(ds)]

    train = _dataset(load(params.split, f"{_KEY}.split"))
    if params.eval_split:
        eval_ = sources.cap_per_domain(_dataset(load(params.eval_split, f"{_KEY}.eval_split")),
                                       params.eval_examples_per_domain)
    else:
        train, eval_ = sources.hold_out(train, params.eval_examples_per_domain, _KEY)
    return datasets.DatasetDict({"train": train, "eval": eval_})


def build_chat_local(params: Any, *, cache_dir: Optional[str | Path] = None):
    """Conversations from local JSONL files: one record a line with a ``messages`` list (``format: chat``) or
    ``chosen`` and ``rejected`` lists sharing their prompt (``format: preference``)."""
    import datasets

    from effitrain.data import sources

    train = _dataset(_read_jsonl(sources.resolve_files(params.path, f"{_KEY}.path"), params, f"{_KEY}.path"))
    if params.eval_path:
        eval_ = _dataset(_read_jsonl(sources.resolve_files(params.eval_path, f"{_KEY}.eval_path"), params,
                                     f"{_KEY}.eval_path"))
        eval_ = sources.cap_per_domain(eval_, params.eval_examples_per_domain)
    else:
        train, eval_ = sources.hold_out(train, params.eval_examples_per_domain, _KEY)
    return datasets.DatasetDict({"train": train, "eval": eval_})


def _column(ds, name: str) -> list[Any]:
    return [json.loads(x) if x else None for x in ds[name]]


def _rows_dataset(rows: np.ndarray, domains: list[str], columns: tuple[str, ...]):
    import datasets

    seq_len = rows.shape[-1]
    flat = rows.reshape(len(rows), -1, seq_len)
    features = datasets.Features({**{c: datasets.Sequence(datasets.Value("int32"), length=seq_len)
                                     for c in columns}, "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({**{c: flat[:, i].astype(np.int32) for i, c in enumerate(columns)},
                                       "domain": domains}, features=features)


def _packed(ds, tokenizer: Any, seq_len: int):
    """Packed conversation rows of ``ds`` (its ``messages``), one domain after another."""
    from effitrain.data.sources import domain_indices

    parts, domains = [], []
    messages = _column(ds, "messages")
    for domain, rows in domain_indices(ds).items():
        encoded = (chat.encode_conversation(tokenizer, messages[r]) for r in rows.tolist())
        packed = chat.pack_conversations(encoded, seq_len, tokenizer.pad_token_id).rows
        parts.append(packed)
        domains += [domain] * len(packed)
    return (np.concatenate(parts) if parts else np.zeros((0, 3, seq_len), np.int64)), domains


def prompt_rows(tokenizer: Any, conversations: list[list[dict]], seq_len: int) -> np.ndarray:
    """``[N, 3, seq_len]``: one conversation a row, cut after its first assistant message: the tokens before the
    first label are the prompt a policy answers, the labelled ones the reference answer (``objective: grpo``).
    Conversations whose answer does not start within ``seq_len`` tokens are dropped."""
    out = []
    for messages in conversations:
        prompt, rest = chat.first_assistant_split(messages, _KEY)
        packed = chat.pack_conversations([chat.encode_conversation(tokenizer, prompt + rest[:1])], seq_len,
                                         tokenizer.pad_token_id).rows
        if len(packed):
            out.append(packed[0])
    if not out:
        raise ConfigError(f"{_KEY}.seq_len: no prompt leaves room for its answer within {seq_len} tokens; raise "
                          f"{_KEY}.seq_len")
    return np.stack(out)


#: bump when the rows built from the same conversations change (cache keys include it)
_ROWS_VERSION = 1


def _cached_rows(parts: tuple, build_rows, cache_dir: Optional[str | Path]):
    """The rows dataset that ``build_rows()`` makes, cached under ``<cache>/chat_rows/<key>`` by ``parts`` (the
    conversations' content, the tokenizer, its chat template, the format and ``seq_len``): rendering and tokenizing
    conversations span by span takes seconds per thousand, and every stage and rank of a pipeline asks for the same
    rows.  A ConfigError raised while building leaves nothing in the cache."""
    import datasets

    from effitrain.data.cache import ContentHash, build_once

    key = ContentHash("chat_rows", _ROWS_VERSION, *parts).hexdigest()
    folder = build_once("chat_rows", key, lambda out: build_rows().save_to_disk(str(out)), cache_root=cache_dir)
    return datasets.load_from_disk(str(folder))


def build_chat_splits(dataset_params: Any, model_params: Any, raw, *, cache_dir: Optional[str | Path] = None,
                      tokenizer_corpus: Any = None):
    """``(tokenizer, train rows, {domain: eval rows})`` as :func:`effitrain.data.packing.build_packed_splits`
    returns them, for chat and preference sources; the rows are cached by content (:func:`_cached_rows`)."""
    from effitrain.data.cache import dataset_content_hash
    from effitrain.data.packing import tokenizer_fingerprint
    from effitrain.data.sources import domain_indices
    from effitrain.data.tokenizer import build_tokenizer

    seq_len, fmt = dataset_params.seq_len, dataset_params.format
    tokenizer = build_tokenizer(model_params, raw["train"] if tokenizer_corpus is None else tokenizer_corpus,
                                cache_dir=cache_dir)
    common = (tokenizer_fingerprint(tokenizer), chat.chat_template(tokenizer), seq_len)
    columns = ("id", "domain", "messages", "rejected")
    train = raw["train"]

    def train_rows():
        if fmt == "preference":
            pairs = list(zip(_column(train, "messages"), _column(train, "rejected")))
            rows = chat.preference_rows(tokenizer, pairs, seq_len, key=_KEY)
            return _rows_dataset(rows, ["preference"] * len(rows), CHANNEL_COLUMNS + REJECTED_COLUMNS)
        if fmt == "prompts":
            rows = prompt_rows(tokenizer, _column(train, "messages"), seq_len)
            return _rows_dataset(rows, ["prompts"] * len(rows), CHANNEL_COLUMNS)
        rows, domains = _packed(train, tokenizer, seq_len)
        if not len(rows):
            raise ConfigError(f"{_KEY}.seq_len: no conversation keeps an assistant token within {seq_len} tokens")
        return _rows_dataset(rows, domains, CHANNEL_COLUMNS)

    packed_train = _cached_rows(("train", fmt, dataset_content_hash(train, columns), *common), train_rows,
                                cache_dir)
    by_domain = {}
    for domain, indices in domain_indices(raw["eval"]).items():
        part = raw["eval"].select(indices)

        def eval_rows(part=part, domain=domain):
            rows, _ = _packed(part, tokenizer, seq_len)
            if not len(rows):
                raise ConfigError(f"{_KEY}.eval_examples_per_domain: the eval conversations of domain '{domain}' "
                                  f"make no row of {seq_len} tokens; raise {_KEY}.seq_len")
            return _rows_dataset(rows, [domain] * len(rows), CHANNEL_COLUMNS)

        by_domain[domain] = _cached_rows(("eval", domain, dataset_content_hash(part, columns), *common), eval_rows,
                                    cache_dir)
    return tokenizer, packed_train, by_domain


def stacked_rows(packed) -> Optional[np.ndarray]:
    """The channels of chat rows stacked: ``[N, 3, S]`` or, for pairs, ``[N, 2, 3, S]``; None for text rows."""
    names = packed.column_names
    if "labels" not in names:
        return None
    from effitrain.data.packing import column_numpy

    rows = np.stack([column_numpy(packed, c) for c in CHANNEL_COLUMNS], axis=1)
    if REJECTED_COLUMNS[0] in names:
        rejected = np.stack([column_numpy(packed, c) for c in REJECTED_COLUMNS], axis=1)
        rows = np.stack([rows, rejected], axis=1)
    return rows
