"""Chat-formatted (instruction) data: conversations as token rows with assistant-only labels, packed so that no
conversation attends to another.

A conversation is a ``messages`` list of ``{"role": "system" | "user" | "assistant", "content": str}``.  It is
rendered with the tokenizer's own chat template, or with :data:`DEFAULT_CHAT_TEMPLATE` when the tokenizer has none
(effitrain's trained BPE has none).  The default is the template of Tülu 3 (open-instruct's ``tulu`` template,
arXiv 2411.15124): every message starts with a role header line (``<|user|>``, ``<|assistant|>``, ``<|system|>``)
and an assistant message ends with the tokenizer's end-of-sequence token, so a model learns to stop.

Labels: only the tokens of assistant messages (their content and the closing EOS) carry a label; the role headers,
system and user messages are ``-100``.  The spans are found from the rendered text, not by searching token ids:
message ``i`` occupies the text between the rendering of ``messages[:i]`` and of ``messages[:i + 1]`` (for an
assistant message the rendering of ``messages[:i]`` *with the generation prompt*, so the ``<|assistant|>`` header
is part of the prompt, not of the answer).  Each span is tokenized on its own and the pieces concatenated, so a
label boundary never falls inside a token.  Generation uses the same rule: the prompt is tokenized span by span,
exactly as in training (:func:`prompt_ids`).

Packing (:func:`pack_conversations`): whole conversations are placed one after another into rows of ``seq_len``
tokens; a conversation that does not fit in what is left of a row starts the next row (one longer than ``seq_len``
is cut at ``seq_len``), and the rest of a row is padding with label ``-100``.  ``position_ids`` restart at 0 at
every conversation (and at the padding).  That is transformers' packed-sequence convention: given ``position_ids``
and no ``attention_mask``, its mask builder (``masking_utils.find_packed_sequence_indices``) makes the causal mask
block-diagonal wherever the positions do not increase by one, for the eager and sdpa kernels as for flash
attention, and RoPE sees every conversation from position 0, so a packed conversation's logits equal its logits
alone (tests/test_posttraining.py checks it).  transformers looks for packing only when no key/value cache is made,
so a batch carries ``use_cache=False`` (a model in eval mode would otherwise make a cache and silently attend across
conversations).

A row is stored as three channels ``[3, seq_len]``: :data:`CHANNELS` = input_ids, labels, position_ids.  A
preference pair (DPO) is two such rows, chosen then rejected, ``[2, 3, seq_len]``, never packed with another pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from effitrain.data.chat_records import ROLES, check_messages, first_assistant_split, shared_prompt  # noqa: F401
from effitrain.data.rows import CHANNELS, IGNORE_INDEX
from effitrain.registry import ConfigError

#: Tülu 3's chat template (open-instruct ``CHAT_TEMPLATES["tulu"]``), used when the tokenizer has none
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's own chat template, or the documented default when it has none."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: Sequence[dict], *, generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def spans(tokenizer: Any, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces whose concatenation is the whole rendering; a piece
    is trained when it is an assistant message's own text (after its header)."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            if not header.startswith(done):
                raise ConfigError("chat template: the rendering of a conversation's start is not a prefix of the "
                                  "rendering with the generation prompt; the assistant tokens cannot be told apart")
            pieces.append((header[len(done):], False))
            done = header
        full = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if not full.startswith(done):
            raise ConfigError(f"chat template: rendering message {i} changes the text before it; the template must "
                              f"render a conversation's messages one after another")
        pieces.append((full[len(done):], message["role"] == "assistant"))
        done = full
    return [(text, trained) for text, trained in pieces if text]


def encode_conversation(tokenizer: Any, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation: labels equal the ids on assistant tokens, -100 elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in spans(tokenizer, messages):
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return ids, labels


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """The ids a model is given to answer the conversation ``messages`` (which ends with a user message): the
    prompt spans tokenized as in training, then the assistant header."""
    convo = [*messages, {"role": "assistant", "content": ""}]
    ids: list[int] = []
    for text, trained in spans(tokenizer, convo):
        if trained:
            break
        ids.extend(_encode(tokenizer, text))
    return ids


def follow_up_ids(tokenizer: Any, message: str) -> list[int]:
    """The ids that follow a finished assistant answer (its EOS included in the answer) when the user says
    ``message`` and the assistant is to answer again: what the template renders between the end of an assistant
    message and the start of the next one's content (for the default template ``\\n<|user|>\\nMESSAGE\\n`` and the
    ``<|assistant|>\\n`` header), tokenized span by span as :func:`encode_conversation` does -- so a multi-turn
    rollout's conversation is token for token the rendering of its messages.  The spans are read off a stand-in
    conversation; a template that renders each message on its own gives the same text whatever that holds."""
    convo = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"},
             {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    pieces = spans(tokenizer, convo)
    first_answer = next(i for i, (_, trained) in enumerate(pieces) if trained)
    ids: list[int] = []
    for text, trained in pieces[first_answer + 1:]:
        if trained:
            break
        ids.extend(_encode(tokenizer, text))
    return ids


@dataclass
class Packed:
    rows: np.ndarray          # int64 [N, 3, seq_len]: input_ids, labels, position_ids
    truncated: int            # conversations cut at seq_len
    conversations: int
    dropped: int = 0          # conversations left without a trained token after the cut: not in any row


def pack_conversations(encoded: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int, *,
                       packing: str = "in_order") -> Packed:
    """Place whole conversations into rows of ``seq_len`` (see the module docstring).

    ``packing: in_order`` fills rows in the given order, a conversation that does not fit starting the next row;
    ``dynamic`` is CodeACT's Dynamic Pack (arXiv 2408.02193: sort by length, then concatenate) done over the whole
    set as first-fit decreasing: longest first, each into the first row with room, so less is padding."""
    kept: list[tuple[list[int], list[int]]] = []
    truncated = count = dropped = 0
    for ids, labels in encoded:
        count += 1
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            dropped += 1  # nothing to learn: the assistant part was cut away (or is only the first token)
            continue
        kept.append((ids, labels))
    lengths = np.array([len(ids) for ids, _ in kept], dtype=np.int64)
    if packing == "dynamic":
        row_of = first_fit_decreasing(lengths, seq_len)
    elif packing == "in_order":
        row_of = np.zeros(len(kept), dtype=np.int64)
        used = row = 0
        for i, n in enumerate(lengths.tolist()):
            if used + n > seq_len:
                row, used = row + 1, 0
            row_of[i] = row
            used += n
    else:
        raise ValueError(f"packing must be in_order or dynamic, got {packing!r}")
    n_rows = int(row_of.max()) + 1 if len(kept) else 0
    out = np.empty((n_rows, 3, seq_len), dtype=np.int64)
    out[:, 0] = pad_id
    out[:, 1] = IGNORE_INDEX
    fill = np.zeros(n_rows, dtype=np.int64)
    for (ids, labels), row in zip(kept, row_of.tolist()):
        start, n = int(fill[row]), len(ids)
        out[row, 0, start:start + n] = ids
        out[row, 1, start:start + n] = labels
        out[row, 2, start:start + n] = np.arange(n)
        fill[row] += n
    for row in range(n_rows):  # the padding counts its positions from 0, like a conversation of its own
        out[row, 2, fill[row]:] = np.arange(seq_len - fill[row])
    return Packed(out, truncated, count, dropped)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The row of every item: items by decreasing length (ties in their order), each into the first row with room."""
    room = np.zeros(0, dtype=np.int64)
    row_of = np.empty(len(lengths), dtype=np.int64)
    for i in np.argsort(-lengths, kind="stable").tolist():
        fits = np.flatnonzero(room >= lengths[i])
        if len(fits):
            row = int(fits[0])
        else:
            room = np.append(room, capacity)
            row = len(room) - 1
        room[row] -= lengths[i]
        row_of[i] = row
    return row_of


def preference_rows(tokenizer: Any, pairs: Iterable[tuple[Sequence[dict], Sequence[dict]]], seq_len: int,
                    key: str = "dataset") -> Packed:
    """``[N, 2, 3, seq_len]`` rows of (chosen, rejected) conversations that share their prompt; pairs where either
    side has no assistant token left after cutting at ``seq_len`` are dropped (counted in ``dropped``)."""
    out = []
    truncated = count = 0
    for chosen, rejected in pairs:
        count += 1
        encoded = [encode_conversation(tokenizer, m) for m in (chosen, rejected)]
        packed = [pack_conversations([e], seq_len, tokenizer.pad_token_id) for e in encoded]
        truncated += any(p.truncated for p in packed)
        if all(len(p.rows) == 1 for p in packed):
            out.append(np.stack([packed[0].rows[0], packed[1].rows[0]]))
    if not out:
        raise ConfigError(f"{key}.seq_len: no preference pair keeps an assistant token within {seq_len} tokens; "
                          f"raise {key}.seq_len")
    return Packed(np.stack(out), truncated, count, count - len(out))


def to_batch(rows: Any) -> dict[str, Any]:
    """A batch from stored rows (a torch tensor): ``[B, 3, S]`` -> input_ids/labels/position_ids ``[B, S]``;
    preference rows ``[B, 2, 3, S]`` -> ``[2B, S]``, the B chosen rows first, then the B rejected ones (what
    the ``dpo`` objective splits in two)."""
    if rows.dim() == 4:
        rows = rows.transpose(0, 1).reshape(-1, *rows.shape[2:])
    return {**{name: rows[:, i] for i, name in enumerate(CHANNELS)}, "use_cache": False}
