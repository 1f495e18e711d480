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
from effitrain.data.rows import CHANNELS, REJECTED_CHANNELS
from effitrain.data.tokenizer import EOS_TOKEN
from effitrain.registry import ConfigError

_KEY = "dataset"
CHANNEL_COLUMNS = CHANNELS
REJECTED_COLUMNS = REJECTED_CHANNELS


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

    from effitrain.data.arithmetic_chat import domain_of, splits

    train, eval_ = splits(params.max_docs_per_domain, params.eval_examples_per_domain, seed=params.seed,
                          max_digits=params.max_digits, style=params.answer_style)
    keep_rejected = params.format == "preference"
    records = [[{"id": e["id"], "domain": domain_of(e["question"], params.domain_by), "messages": e["messages"],
                 "rejected": e["rejected"] if keep_rejected else None} for e in split] for split in (train, eval_)]
    return datasets.DatasetDict({"train": _dataset(records[0]), "eval": _dataset(records[1])})


def read_chat_files(files: list[str], params: Any, key: str) -> tuple[list[dict], Any]:
    """The records of chat JSONL files and what reading them found (:mod:`effitrain.data.chat_records`: the same
    checks as ``effitrain check``, so a bad file is refused with the same line)."""
    from effitrain.data.chat_records import ChatRecords, describe, read_jsonl

    reader = ChatRecords(params, key)
    records = list(read_jsonl(files, reader))
    return records, reader.finish(describe(files))


def build_chat_hub(params: Any, *, cache_dir: Optional[str | Path] = None):
    """Conversations from a Hugging Face dataset (a hub id, or a local dataset folder): ``split`` for training,
    ``eval_split`` (or a hold-out of ``split``) for evaluation.  Hub downloads go to the ordinary Hugging Face cache,
    so ``HF_DATASETS_OFFLINE=1`` runs from it."""
    import datasets

    from effitrain.data import sources
    from effitrain.data.chat_records import ChatRecords

    def load(split: str, key: str) -> list[dict]:
        try:
            ds = datasets.load_dataset(params.path, params.config_name, split=split, revision=params.revision)
        except ConnectionError as exc:
            raise ConfigError(f"{_KEY}.path: cannot reach '{params.path}' on the Hugging Face hub and it is not in "
                              f"the local cache ({str(exc).splitlines()[0] if str(exc) else 'offline'})") from None
        except (FileNotFoundError, ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{key}: cannot load '{params.path}' split {split!r}: {message}") from None
        reader = ChatRecords(params, key)
        records = [reader.add(row, f"row {i + 1}", f"{split}-{i:09d}") for i, row in enumerate(ds)]
        reader.finish(f"'{params.path}' split {split!r}")
        return records

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

    train = _dataset(read_chat_files(sources.resolve_files(params.path, f"{_KEY}.path"), params, f"{_KEY}.path")[0])
    if params.eval_path:
        eval_ = _dataset(read_chat_files(sources.resolve_files(params.eval_path, f"{_KEY}.eval_path"), params,
                                         f"{_KEY}.eval_path")[0])
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


def _packed(ds, tokenizer: Any, seq_len: int, packing: str = "in_order") -> tuple[chat.Packed, list[str]]:
    """Packed conversation rows of ``ds`` (its ``messages``), one domain after another, with the counts of all."""
    from effitrain.data.sources import domain_indices

    parts, domains = [], []
    truncated = count = dropped = 0
    messages = _column(ds, "messages")
    for domain, rows in domain_indices(ds).items():
        encoded = (chat.encode_conversation(tokenizer, messages[r]) for r in rows.tolist())
        packed = chat.pack_conversations(encoded, seq_len, tokenizer.pad_token_id, packing=packing)
        parts.append(packed.rows)
        domains += [domain] * len(packed.rows)
        truncated, count, dropped = truncated + packed.truncated, count + packed.conversations, dropped + packed.dropped
    rows = np.concatenate(parts) if parts else np.zeros((0, 3, seq_len), np.int64)
    return chat.Packed(rows, truncated, count, dropped), domains


def prompt_rows(tokenizer: Any, conversations: list[list[dict]], seq_len: int) -> chat.Packed:
    """``[N, 3, seq_len]``: one conversation a row, cut after its first assistant message: the tokens before the
    first label are the prompt a policy answers, the labelled ones the reference answer (``objective: grpo``).
    Conversations whose answer does not start within ``seq_len`` tokens are dropped (counted in ``dropped``)."""
    out = []
    truncated = 0
    for messages in conversations:
        prompt, rest = chat.first_assistant_split(messages, _KEY)
        packed = chat.pack_conversations([chat.encode_conversation(tokenizer, prompt + rest[:1])], seq_len,
                                         tokenizer.pad_token_id)
        truncated += packed.truncated
        if len(packed.rows):
            out.append(packed.rows[0])
    if not out:
        raise ConfigError(f"{_KEY}.seq_len: no prompt leaves room for its answer within {seq_len} tokens; raise "
                          f"{_KEY}.seq_len")
    return chat.Packed(np.stack(out), truncated, len(conversations), len(conversations) - len(out))


def _prompt_rows_by_domain(ds: Any, tokenizer: Any, seq_len: int) -> tuple[chat.Packed, list[str]]:
    """:func:`prompt_rows` of ``ds``, one domain after another, with each row's domain: a curriculum over data
    distributions (``curriculum: dump``) draws prompts by domain."""
    from effitrain.data.sources import domain_indices

    messages = _column(ds, "messages")
    parts, domains = [], []
    truncated = count = dropped = 0
    for domain, rows in domain_indices(ds).items():
        try:
            packed = prompt_rows(tokenizer, [messages[i] for i in rows], seq_len)
        except ConfigError:  # no prompt of this domain fits: all dropped (the other domains may fit)
            count, dropped = count + len(rows), dropped + len(rows)
            continue
        parts.append(packed.rows)
        domains += [domain] * len(packed.rows)
        truncated, count, dropped = truncated + packed.truncated, count + packed.conversations, dropped + packed.dropped
    if not parts:
        raise ConfigError(f"{_KEY}.seq_len: no prompt leaves room for its answer within {seq_len} tokens; raise "
                          f"{_KEY}.seq_len")
    return chat.Packed(np.concatenate(parts), truncated, count, dropped), domains


#: bump when the rows built from the same conversations change (cache keys include it); 2: counts.json beside them;
#: 3: prompt rows keep their conversation's domain (they were all labelled 'prompts')
_ROWS_VERSION = 3
_COUNTS = "counts.json"


def _cached_rows(parts: tuple, build_rows, cache_dir: Optional[str | Path]) -> tuple[Any, dict[str, int]]:
    """The rows dataset that ``build_rows()`` makes and its counts (``build_rows`` returns both), cached under
    ``<cache>/chat_rows/<key>`` by ``parts`` (the conversations' content, the tokenizer, its chat template, the
    format and ``seq_len``): rendering and tokenizing conversations span by span takes seconds per thousand, and
    every stage and rank of a pipeline asks for the same rows.  The counts are kept beside the rows, so a run that
    reuses them reports what was dropped as the run that built them did.  A ConfigError raised while building
    leaves nothing in the cache."""
    import datasets

    from effitrain.data.cache import ContentHash, build_once

    def build(out: Path) -> None:
        rows, counts = build_rows()
        rows.save_to_disk(str(out))
        (out / _COUNTS).write_text(json.dumps(counts))

    key = ContentHash("chat_rows", _ROWS_VERSION, *parts).hexdigest()
    folder = build_once("chat_rows", key, build, cache_root=cache_dir)
    counts = json.loads((folder / _COUNTS).read_text()) if (folder / _COUNTS).is_file() else {}
    return datasets.load_from_disk(str(folder)), counts


def _counts(packed: chat.Packed) -> dict[str, int]:
    return {"conversations": packed.conversations, "dropped": packed.dropped, "truncated": packed.truncated}


def report_dropped(counts: dict[str, int], seq_len: int, what: str) -> Optional[str]:
    """The console line for conversations that lost every trained token to the cut at ``seq_len`` (None if none):
    they are not trained on, and a user who sized ``seq_len`` for most of the data should know how many."""
    dropped, total = counts.get("dropped", 0), counts.get("conversations", 0)
    if not dropped:
        return None
    return (f"{_KEY}: {dropped} of {total} {what} keep no answer token within {_KEY}.seq_len={seq_len} and are "
            f"left out of training; raise {_KEY}.seq_len to keep them")


def build_chat_splits(dataset_params: Any, model_params: Any, raw, *, cache_dir: Optional[str | Path] = None,
                      tokenizer_corpus: Any = None):
    """``(tokenizer, train rows, {domain: eval rows})`` as :func:`effitrain.data.splits.build_packed_splits`
    returns them, for chat and preference sources; the rows are cached by content (:func:`_cached_rows`)."""
    from effitrain.console import say
    from effitrain.data.cache import dataset_content_hash
    from effitrain.data.packing import tokenizer_fingerprint
    from effitrain.data.sources import domain_indices
    from effitrain.data.tokenizer import build_tokenizer

    seq_len, fmt = dataset_params.seq_len, dataset_params.format
    tokenizer = build_tokenizer(model_params, raw["train"] if tokenizer_corpus is None else tokenizer_corpus,
                                cache_dir=cache_dir)
    if getattr(dataset_params, "answer_style", None) == "thinkless":  # the mode-choosing tokens, one id each
        from effitrain.data.arithmetic_chat import add_control_tokens

        tokenizer = add_control_tokens(tokenizer)
    common = (tokenizer_fingerprint(tokenizer), chat.chat_template(tokenizer), seq_len)
    columns = ("id", "domain", "messages", "rejected")
    train = raw["train"]

    def train_rows():
        if fmt == "preference":
            pairs = list(zip(_column(train, "messages"), _column(train, "rejected")))
            packed = chat.preference_rows(tokenizer, pairs, seq_len, key=_KEY)
            return (_rows_dataset(packed.rows, ["preference"] * len(packed.rows), CHANNEL_COLUMNS + REJECTED_COLUMNS),
                    _counts(packed))
        if fmt == "prompts":
            packed, domains = _prompt_rows_by_domain(train, tokenizer, seq_len)
            return _rows_dataset(packed.rows, domains, CHANNEL_COLUMNS), _counts(packed)
        packed, domains = _packed(train, tokenizer, seq_len, packing)
        if not len(packed.rows):
            raise ConfigError(f"{_KEY}.seq_len: none of the {packed.conversations} conversations keeps an assistant "
                              f"token within {seq_len} tokens; raise {_KEY}.seq_len")
        return _rows_dataset(packed.rows, domains, CHANNEL_COLUMNS), _counts(packed)

    packing = getattr(dataset_params, "packing", "in_order")
    # only a non-default packing enters the key: the rows packed in order keep their cache
    packing_key = () if packing == "in_order" or fmt != "chat" else (("packing", packing),)
    packed_train, counts = _cached_rows(("train", fmt, dataset_content_hash(train, columns), *common, *packing_key),
                                        train_rows, cache_dir)
    line = report_dropped(counts, seq_len, {"preference": "preference pairs", "prompts": "prompts"}.get(
        fmt, "training conversations"))
    if line:
        say(line)
    by_domain = {}
    for domain, indices in domain_indices(raw["eval"]).items():
        part = raw["eval"].select(indices)

        def eval_rows(part=part, domain=domain):
            packed, _ = _packed(part, tokenizer, seq_len)
            if not len(packed.rows):
                raise ConfigError(f"{_KEY}.eval_examples_per_domain: the eval conversations of domain '{domain}' "
                                  f"make no row of {seq_len} tokens; raise {_KEY}.seq_len")
            return _rows_dataset(packed.rows, [domain] * len(packed.rows), CHANNEL_COLUMNS), _counts(packed)

        by_domain[domain] = _cached_rows(("eval", domain, dataset_content_hash(part, columns), *common), eval_rows,
                                         cache_dir)[0]
    return tokenizer, packed_train, by_domain
