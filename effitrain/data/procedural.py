"""Procedurally generated formal-language documents for pre-pretraining (Hu et al. 2025, "Between Circuits and
Chomsky: Pre-pretraining on Formal Languages Imparts Linguistic Biases", arXiv 2502.19249).

The languages follow the authors' generators (``src/grammar.py`` of github.com/michahu/pre-pretraining); a symbol is
an integer written in decimal, symbols separated by spaces, so the run's own tokenizer encodes them like any text:

* ``shuffle_dyck`` (k-Shuffle Dyck, the paper's best language): ``k`` bracket types that close independently (the
  interleavings of k Dyck languages, cross-serial dependencies).  Opening bracket ``i`` is symbol ``i``, its closing
  bracket ``i + k``.  From depth 0 it must open; at ``max_depth`` it must close; otherwise it opens with probability
  ``p_open`` (a uniformly drawn type) or closes a uniformly drawn *type among the open ones*.  The authors use
  ``k = 64``, ``p_open = 0.51``, ``max_depth = 8``, truncated at the target length (the last word may stay open).
* ``dyck`` (k-Dyck, nested): like the above, but the bracket that closes is always the most recent open one (a
  stack); a word ends when the stack empties and words are concatenated up to the target length.  The authors'
  defaults: ``max_depth = 16``.
* ``copy`` (the ``ww`` language): a random word ``w`` of uniformly drawn symbols (length 10 .. length/2) followed by
  itself, repeated up to the target length.

Every document is generated from ``numpy.random.default_rng([seed, language, index])``, so the data is a pure
function of its parameters: the same in every run and on every rank, with nothing downloaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LANGUAGES = ("shuffle_dyck", "dyck", "copy")
DOMAIN = "procedural"


def shuffle_dyck(rng: np.random.Generator, length: int, *, k: int, p_open: float = 0.51,
                 max_depth: int = 8) -> list[int]:
    seq: list[int] = []
    counts = np.zeros(k, np.int64)
    depth = 0
    while len(seq) < length:
        if depth == 0 or (depth < max_depth and rng.random() < p_open):
            b = int(rng.integers(k))
            counts[b] += 1
            depth += 1
            seq.append(b)
        else:
            b = int(rng.choice(np.flatnonzero(counts)))
            counts[b] -= 1
            depth -= 1
            seq.append(b + k)
    return seq


def dyck(rng: np.random.Generator, length: int, *, k: int, p_open: float = 0.5, max_depth: int = 16) -> list[int]:
    seq: list[int] = []
    stack: list[int] = []
    while len(seq) < length:
        if not stack or (len(stack) < max_depth and rng.random() < p_open):
            b = int(rng.integers(k))
            stack.append(b)
            seq.append(b)
        else:
            seq.append(stack.pop() + k)
    return seq


def copy(rng: np.random.Generator, length: int, *, k: int) -> list[int]:
    seq: list[int] = []
    while len(seq) < length:
        w = rng.integers(k, size=int(rng.integers(10, max(11, length // 2) + 1))).tolist()
        seq.extend(w + w)
    return seq[:length]


_GENERATORS = {"shuffle_dyck": shuffle_dyck, "dyck": dyck, "copy": copy}


def generate(language: str, index: int, *, seed: int, symbols: int, length: int) -> list[int]:
    """Document ``index`` of ``language``: ``length`` symbols."""
    rng = np.random.default_rng([seed % 2**63, LANGUAGES.index(language), index])
    return _GENERATORS[language](rng, length, k=symbols)


def procedural_documents(count: int, *, language: str, seed: int, symbols: int, length: int) -> Any:
    """``count`` generated documents as a ``datasets.Dataset`` with the corpus columns ``id``, ``text``, ``domain``
    (the domain is ``procedural``)."""
    import datasets

    texts = [" ".join(map(str, generate(language, i, seed=seed, symbols=symbols, length=length)))
             for i in range(count)]
    return datasets.Dataset.from_dict({"id": [f"{DOMAIN}-{language}-{i:06d}" for i in range(count)],
                                       "text": texts, "domain": [DOMAIN] * count})


def with_procedural(train: Any, params: Any) -> Any:
    """``train`` plus the generated documents that ``params`` (the dataset block) asks for; ``train`` unchanged
    when it asks for none (``procedural_docs: 0``)."""
    count = getattr(params, "procedural_docs", 0)
    if not count:
        return train
    import datasets

    generated = procedural_documents(count, language=params.procedural_language, seed=params.procedural_seed,
                                     symbols=params.procedural_symbols, length=params.procedural_length)
    return datasets.concatenate_datasets([train.select_columns(["id", "text", "domain"]),
                                          generated.cast(train.select_columns(["id", "text", "domain"]).features)])
