"""Untie the Knots (Tian et al. 2024, arXiv 2409.04774): documents cut into chunks, the chunks of several documents
shuffled into one training sequence, and a tracing task that asks the model to recover each document's chunks in
their original order.

How a sequence is built (the authors' ``gpt_dataset_utk.py`` of rgtjf/Untie-the-Knots, with ``add_sort_task``)
--------------------------------------------------------------------------------------------------------------
Documents are taken in a seeded order and placed into a row of ``seq_len`` tokens.  A row is *knotted* with
probability ``knot_probability`` (the authors draw, per sequence, whether its documents are chunked); otherwise its
documents are concatenated as ordinary packing does.  In a knotted row:

1. every document that fits whole is cut into ``chunks_per_doc`` pieces at ``len // n * k`` (the authors' equal
   split; the last piece takes the remainder); a document shorter than ``chunks_per_doc`` tokens stays one piece;
2. the pieces of all these documents are shuffled (``preserve_partial_order`` keeps each document's pieces in their
   order, as the authors' option of that name);
3. every piece of a multi-piece document is preceded by a header ``<D> id </D>`` with a random 6-character id
   (a fresh id per piece);
4. right after the piece of a document that comes last in the row, a summary ``<S> id_1 <s> id_2 ... </S>`` lists
   the ids of that document's pieces in their original order: the retrieval ("tracing") task -- to write it the
   model must find every piece of the document in the row and know their order;
5. the document that does not fit whole contributes its prefix, unchunked, at the very end of the row (the authors
   keep the last part of the last document in place, because the row boundary cuts it); the rest of it starts the
   next row.

So every token of every document appears exactly once in the rows (the last row is padded with masked
end-of-text tokens), which the authors' version (that truncates after adding the markers) does not guarantee.

Loss mask (True = a training target), as the authors' ``loss_mask``: the header tokens are not targets (ids are
random), nor is the first token of a piece after a header (it cannot be predicted from the header), nor the ``<S>``
that opens a summary, nor the token after a summary's ``</S>``; the summary's ids and ``</S>`` are targets.

The markers are the tokenizer's own tokens for the strings ``<D>``, ``</D>``, ``<S>``, ``<s>``, ``</S>`` (the authors
add five special tokens to the vocabulary; a model here keeps its vocabulary).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

MARKERS = ("<D>", "</D>", "<S>", "<s>", "</S>")
_ID_CHARS = np.array(list(string.ascii_letters + string.digits))
ID_LENGTH = 6  # the authors' generate_random_string(6)


@dataclass(frozen=True)
class Markers:
    """Token ids of the five markers and a tokenizer to spell the random ids."""
    doc_open: np.ndarray
    doc_close: np.ndarray
    sum_open: np.ndarray
    sum_sep: np.ndarray
    sum_close: np.ndarray
    tokenizer: Any

    @classmethod
    def of(cls, tokenizer: Any) -> "Markers":
        return cls(*(_encode(tokenizer, m) for m in MARKERS), tokenizer=tokenizer)

    def doc_id(self, rng: np.random.Generator) -> np.ndarray:
        return _encode(self.tokenizer, "".join(rng.choice(_ID_CHARS, size=ID_LENGTH)))


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer([text], add_special_tokens=False)["input_ids"][0], dtype=np.int32)


def split_points(n_tokens: int, chunks_per_doc: int) -> list[int]:
    """The starts of a document's pieces (the authors' ``len(sample) // n_chunks * chunk_id``)."""
    if n_tokens < chunks_per_doc or chunks_per_doc <= 1:
        return [0]
    step = n_tokens // chunks_per_doc
    return [step * k for k in range(chunks_per_doc)]


class _RowWriter:
    """Tokens, target mask and the tables of one row being written."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.tokens: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self.used = 0
        self.pieces: list[tuple[int, ...]] = []
        self.summaries: list[tuple[int, ...]] = []
        self._skip_next = False

    def put(self, tokens: np.ndarray, target: bool | np.ndarray) -> int:
        start = self.used
        self.tokens.append(np.asarray(tokens, np.int32))
        self.mask.append(np.broadcast_to(np.asarray(target, bool), (len(tokens),)).copy())
        self.used += len(tokens)
        return start

    def untrain_next(self) -> None:
        """The token written next is not a target (it follows a header or a summary)."""
        self._skip_next = True

    def put_text(self, tokens: np.ndarray) -> int:
        mask = np.ones(len(tokens), bool)
        if self._skip_next and len(tokens):
            mask[0] = False
        self._skip_next = False
        return self.put(tokens, mask)


def knotted_rows(docs: Sequence[np.ndarray], seq_len: int, *, markers: Markers, chunks_per_doc: int,
                 knot_probability: float, preserve_partial_order: bool, pad_id: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Rows of ``seq_len`` tokens built from ``docs`` (token ids, each ending with end-of-text) as the module says.

    Returns ``rows`` (int32 ``[n, seq_len]``), ``mask`` (bool, True = training target), ``knotted`` (bool ``[n]``),
    ``first_doc`` (int64 ``[n]``: the document the row's first piece comes from), ``pieces`` (int64 ``[m, 6]``: row,
    start in the row, length, document, piece index in the document, offset in the document; a tail prefix has
    piece index -1) and ``summaries`` (int64 ``[k, 4]``: row, start, length, document).
    """
    rows, masks, knotted, first_doc, pieces, summaries = [], [], [], [], [], []
    for row in knotted_row_stream([len(d) for d in docs], docs.__getitem__, seq_len, markers=markers,
                                  chunks_per_doc=chunks_per_doc, knot_probability=knot_probability,
                                  preserve_partial_order=preserve_partial_order, pad_id=pad_id, seed=seed):
        rows.append(row.tokens)
        masks.append(row.mask)
        knotted.append(row.knotted)
        first_doc.append(row.first_doc)
        pieces += row.pieces
        summaries += row.summaries
    return {"rows": np.stack(rows) if rows else np.zeros((0, seq_len), np.int32),
            "mask": np.stack(masks) if masks else np.zeros((0, seq_len), bool),
            "knotted": np.asarray(knotted, bool), "first_doc": np.asarray(first_doc, np.int64),
            "pieces": np.asarray(pieces, np.int64).reshape(-1, 6),
            "summaries": np.asarray(summaries, np.int64).reshape(-1, 4)}


@dataclass
class KnottedRow:
    """One row of :func:`knotted_row_stream`: its ``tokens`` and target ``mask`` (``seq_len`` each), whether it is
    ``knotted``, the document its first piece comes from (``first_doc``, -1 for none) and its rows of the
    ``pieces`` and ``summaries`` tables (:func:`knotted_rows`)."""
    tokens: np.ndarray
    mask: np.ndarray
    knotted: bool
    first_doc: int
    pieces: list
    summaries: list


def knotted_row_stream(lengths: Sequence[int], read: Callable[[int], np.ndarray], seq_len: int, *,
                       markers: Markers, chunks_per_doc: int, knot_probability: float,
                       preserve_partial_order: bool, pad_id: int, seed: int) -> Iterator[KnottedRow]:
    """:func:`knotted_rows` a row at a time, for documents known by their token counts (``lengths``, EOS included)
    and read on demand (``read(d)``: document ``d``'s tokens) -- so a corpus on disk is knotted reading only the
    documents of the row being built (the sharded data engine reads them from its token streams).  What is held
    is the seeded document order (8 bytes a document) and one row's documents."""
    if seq_len < 1 or chunks_per_doc < 1:
        raise ValueError("seq_len and chunks_per_doc must be positive")
    rng = np.random.default_rng([seed % 2**63, 0x4b4e4f54])
    order = rng.permutation(len(lengths))
    # the documents in order, front first; a document cut by a row boundary goes back to the front with the offset
    # of its remaining part, and continues the next row
    front: Optional[tuple[int, int]] = None
    position = 0
    row_number = 0
    while front is not None or position < len(order):
        writer = _RowWriter(row_number)
        knot = bool(rng.random() < knot_probability)
        whole: list[tuple[int, int, list[int], list[np.ndarray]]] = []  # doc, offset, piece starts, piece ids
        budget = seq_len
        tail = None
        while (front is not None or position < len(order)) and budget > 0:
            doc, offset = front if front is not None else (int(order[position]), 0)
            length = int(lengths[doc]) - offset
            starts = split_points(length, chunks_per_doc) if knot else [0]
            ids = [markers.doc_id(rng) for _ in starts] if len(starts) > 1 else []
            overhead = sum(len(markers.doc_open) + len(i) + len(markers.doc_close) for i in ids)
            if ids:
                overhead += len(markers.sum_open) + len(markers.sum_close) + \
                    sum(len(i) for i in ids) + len(markers.sum_sep) * (len(ids) - 1)
            if front is not None:
                front = None
            else:
                position += 1
            if length + overhead <= budget:
                whole.append((doc, offset, starts, ids))
                budget -= length + overhead
            else:  # its prefix closes the row, the rest starts the next one
                tail = (doc, offset, budget)
                if budget < length:
                    front = (doc, offset + budget)
                budget = 0
        tokens_of = {doc: read(doc) for doc in dict.fromkeys([w[0] for w in whole] + ([tail[0]] if tail else []))}
        entries = [(w, p) for w in range(len(whole)) for p in range(len(whole[w][2]))]
        if knot:
            placement = rng.permutation(len(entries))
            if preserve_partial_order:  # each document's pieces take its places in their own order
                for w in range(len(whole)):
                    slots = sorted(placement[i] for i, e in enumerate(entries) if e[0] == w)
                    for slot, i in zip(slots, [i for i, e in enumerate(entries) if e[0] == w]):
                        placement[i] = slot
            entries = [entries[i] for i in np.argsort(placement, kind="stable")]
        last_of = {w: max(i for i, e in enumerate(entries) if e[0] == w) for w in range(len(whole))}
        for i, (w, p) in enumerate(entries):
            doc, offset, starts, ids = whole[w]
            begin = offset + starts[p]
            end = offset + (starts[p + 1] if p + 1 < len(starts) else int(lengths[doc]) - offset)
            if ids:
                writer.put(np.concatenate([markers.doc_open, ids[p], markers.doc_close]), False)
                writer.untrain_next()
            start = writer.put_text(tokens_of[doc][begin:end])
            writer.pieces.append((writer.row, start, end - begin, doc, p, begin))
            if ids and i == last_of[w]:
                body = [markers.sum_open]
                for k, piece_id in enumerate(ids):
                    body += ([markers.sum_sep] if k else []) + [piece_id]
                body.append(markers.sum_close)
                tokens = np.concatenate(body)
                target = np.ones(len(tokens), bool)
                target[:len(markers.sum_open)] = False  # where a summary starts is not predictable
                s = writer.put(tokens, target)
                writer.summaries.append((writer.row, s, len(tokens), doc))
                writer.untrain_next()
        if tail is not None:
            doc, offset, n = tail
            n = min(n, int(lengths[doc]) - offset)
            start = writer.put_text(tokens_of[doc][offset:offset + n])
            writer.pieces.append((writer.row, start, n, doc, -1, offset))
        if writer.used < seq_len:  # only the last row: padding that is never a target
            writer.put(np.full(seq_len - writer.used, pad_id, np.int32), False)
        yield KnottedRow(np.concatenate(writer.tokens), np.concatenate(writer.mask), knot,
                         writer.pieces[0][3] if writer.pieces else -1, writer.pieces, writer.summaries)
        row_number += 1
