"""From the documents to what the engine trains on: ``(tokenizer, packed_train, packed_eval_by_domain)``.

This is the dispatcher above the data formats: it looks the dataset's ``format`` up in :data:`ROW_BUILDERS` and
calls that format's builder, so the formats (:mod:`effitrain.data.packing` for text, ``chat_sources`` for
conversations, ``decompose``, ``conditional``) import only the packing primitives below them and never each other.
A new format is a module with a builder of this signature and one entry in the table.  It sits in the blocks layer
(docs/architecture.md, "Layers"), beside the selection scorers that rate segments for control tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from effitrain.console import say
from effitrain.curriculum.row_scores import scorer_text_scores
from effitrain.data.cache import quiet_progress
from effitrain.data.chat_sources import build_chat_splits
from effitrain.data.conditional import condition_documents
from effitrain.data.decompose import pack_decomposed
from effitrain.data.packing import pack
from effitrain.data.procedural import with_procedural
from effitrain.data.sources import domain_indices
from effitrain.data.synthetic import with_synthetic
from effitrain.data.tokenizer import build_tokenizer
from effitrain.registry import ConfigError


def build_packed_splits(dataset_params: Any, model_params: Any, raw, *, cache_dir: Optional[str | Path] = None,
                        tokenizer_corpus: Any = None):
    """``(tokenizer, packed_train, packed_eval_by_domain)`` for the dataset's format (:data:`ROW_BUILDERS`).

    * ``raw``: the ``DatasetDict`` with ``train`` (after selection) and ``eval`` splits;
    * the tokenizer comes from :func:`effitrain.data.tokenizer.build_tokenizer` (a BPE is trained on
      ``tokenizer_corpus``, default ``train``; the engine passes the whole pool, so that runs with different data
      selections share one tokenizer and their per-token losses stay comparable);
    * ``packed_train``: every train document packed to ``dataset_params.seq_len``;
    * ``packed_eval_by_domain``: ``{domain: packed eval rows of that domain}`` in sorted domain order.

    Raises ConfigError when the train split yields no full sequence or an eval domain yields none, naming the
    settings to change.
    """
    builder = ROW_BUILDERS[getattr(dataset_params, "format", "text")]
    return builder(dataset_params, model_params, raw, cache_dir=cache_dir, tokenizer_corpus=tokenizer_corpus)


def build_text_splits(dataset_params: Any, model_params: Any, raw, *, cache_dir: Optional[str | Path] = None,
                      tokenizer_corpus: Any = None):
    """Plain documents: concatenated per domain and cut into rows (or decomposed into power-of-two pieces), with
    generated documents and control tokens added to the train split when the dataset asks for them."""
    seq_len = dataset_params.seq_len
    num_proc = getattr(dataset_params, "num_proc", 1)
    with quiet_progress(len(raw["train"])):
        corpus = raw["train"] if tokenizer_corpus is None else tokenizer_corpus
        tokenizer = build_tokenizer(model_params, corpus, cache_dir=cache_dir)
        # generated and model-made (dataset.synthetic) documents join the train split after the tokenizer is
        # trained, so the tokenizer (and the per-token eval losses) stay those of runs without them
        train_docs = with_synthetic(with_procedural(raw["train"], dataset_params), dataset_params)
        control = getattr(dataset_params, "control_tokens", None)
        if control is not None:  # conditional training: a control token before every rated segment
            tokenizer, train_docs = _with_control_tokens(train_docs, tokenizer, control,
                                                         seed=getattr(dataset_params, "seed", 0))
        if getattr(dataset_params, "packing", "concatenate") == "decompose":
            packed_train = pack_decomposed(train_docs, tokenizer, seq_len, dataset_params.min_piece_len,
                                           seed=getattr(dataset_params, "seed", 0), num_proc=num_proc,
                                           cache_dir=cache_dir)
        else:
            packed_train = pack(train_docs, tokenizer, seq_len, num_proc, cache_dir=cache_dir)
        if len(packed_train) == 0:
            raise ConfigError(f"dataset.seq_len: the train split has fewer than {seq_len} tokens in every domain; "
                              f"lower seq_len or add documents")
        packed_eval = pack(raw["eval"], tokenizer, seq_len, num_proc, cache_dir=cache_dir)
        by_domain = {}
        rows = domain_indices(packed_eval)
        for domain in sorted(domain_indices(raw["eval"])):
            if domain not in rows:
                raise ConfigError(f"dataset.eval_examples_per_domain: the eval documents of domain '{domain}' make "
                                  f"less than one sequence of {seq_len} tokens; raise it or lower dataset.seq_len")
            by_domain[domain] = packed_eval.select(rows[domain])
    return tokenizer, packed_train, by_domain


def _with_control_tokens(docs: Any, tokenizer: Any, control: Any, *, seed: int,
                         key: str = "dataset.control_tokens") -> tuple[Any, Any]:
    """The tokenizer with the control tokens and the documents with a token before every segment that
    ``control.scorer`` rated (:mod:`effitrain.data.conditional`); the counts go to the console."""
    def scores_of(segments: list[str]) -> np.ndarray:
        return scorer_text_scores(control.scorer, segments, seed=seed, key=f"{key}.scorer", group="conditional",
                                  what="control tokens")

    tokenizer, docs, info = condition_documents(docs, tokenizer, control, scores_of)
    say(f"control tokens: {info['good']} {control.good_token} / {info['bad']} {control.bad_token} of "
        f"{info['segments']} {control.segment} segments ({info['without_token']} without), threshold "
        f"{info['threshold']:.4g} ({'<=' if control.good_when == 'low' else '>='} is good)")
    return tokenizer, docs


#: the builder of each ``dataset.format``: conversations have their own rows (labels, position ids, pairs)
ROW_BUILDERS: dict[str, Callable[..., tuple[Any, Any, dict[str, Any]]]] = {
    "text": build_text_splits,
    "chat": build_chat_splits,
    "preference": build_chat_splits,
    "prompts": build_chat_splits,
}
