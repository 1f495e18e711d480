"""Tokenizers: a byte-level BPE trained on the training split, or a named Hugging Face tokenizer.

The trained BPE is cached under ``<cache>/tokenizers/<key>``, where the key hashes the training texts, the
vocabulary size and the ``tokenizers`` version; torchrun ranks that ask at once train it once (see
:func:`effitrain.data.cache.build_once`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional

from effitrain.data.cache import ContentHash, build_once, dataset_content_hash
from effitrain.registry import ConfigError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_FORMAT_VERSION = 1
# A trained BPE sees at most this many documents: enough text for a vocabulary of tens of thousands of entries, and a
# bound on what the sharded data engine keeps in memory per task.  Smaller corpora (every built-in recipe) give it
# all their training documents, as before.
BPE_SAMPLE_DOCS = 20_000
_SAMPLE_SALT = b"effitrain-bpe-sample\0"


def sample_rank(text: str) -> int:
    """A document's rank for the BPE's training sample: a salted hash of its text.  The sample is the
    :data:`BPE_SAMPLE_DOCS` training documents of lowest rank (ties: the earlier document), in corpus order -- a
    uniform draw that the in-memory path and the sharded data engine make alike, wherever a document sits."""
    return int.from_bytes(hashlib.blake2b(_SAMPLE_SALT + text.encode("utf-8"), digest_size=8).digest(), "big")


def bpe_sample(train):
    """The documents of ``train`` (a ``datasets.Dataset`` with ``text``) a BPE is trained on (:func:`sample_rank`)."""
    if len(train) <= BPE_SAMPLE_DOCS:
        return train
    import numpy as np

    from effitrain.data.sources import arrow_column

    ranks = np.fromiter((sample_rank(t) for t in arrow_column(train, "text").to_pylist()), dtype=np.uint64,
                        count=len(train))
    order = np.lexsort((np.arange(len(train)), ranks))  # by rank, then position
    return train.select(np.sort(order[:BPE_SAMPLE_DOCS]))


def _batches(train, batch_size: int = 1000) -> Iterator[list[str]]:
    for batch in train.select_columns(["text"]).with_format(None).iter(batch_size=batch_size):
        yield batch["text"]


def train_bpe(train, vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE on ``train["text"]`` and ``save_pretrained`` it into ``out_dir``.

    Byte-level means every string is encodable (no unknown token) and decoding is exact.  ``<|endoftext|>`` is the
    end-of-document token (also BOS) and ``<|pad|>`` pads; both are single ids that never occur inside text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(_batches(train), trainer=trainer, length=len(train))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=1_000_000_000)
    fast.save_pretrained(str(out_dir))


def bpe_cache_key(train, vocab_size: int) -> str:
    import tokenizers

    return ContentHash("bpe", _FORMAT_VERSION, tokenizers.__version__, vocab_size,
                       dataset_content_hash(train, ("text",))).hexdigest()


def _ensure_special_tokens(tokenizer: Any, name: str) -> Any:
    """Packing needs an end-of-document id and batching a pad id.  Models without a pad token pad with EOS (the
    padded positions are masked out of the loss anyway); a tokenizer without any EOS cannot separate documents."""
    if tokenizer.eos_token_id is None:
        if tokenizer.sep_token is not None:  # encoder-style tokenizers mark document ends with SEP
            tokenizer.eos_token = tokenizer.sep_token
        else:
            raise ConfigError(f"model.tokenizer: '{name}' has no end-of-sequence token, which packing needs to "
                              f"separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_vocab_size(model_params: Any) -> int:
    """A pretrained model's own vocabulary size (its config.json), for a BPE trained to fit its embedding."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(model_params.path).vocab_size)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model.vocab_size: cannot read the vocabulary size of '{model_params.path}' "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); set model.vocab_size") \
            from None


def build_tokenizer(model_params: Any, train, *, cache_dir: Optional[str | Path] = None):
    """The tokenizer of a run: a ``transformers`` fast tokenizer with ``eos_token_id`` and ``pad_token_id`` set.

    * ``model_params.tokenizer == "bpe"``: a byte-level BPE with ``model_params.vocab_size`` entries (the two
      special tokens included) trained on ``train`` (at most :data:`BPE_SAMPLE_DOCS` of its documents, see
      :func:`bpe_sample`) (a ``datasets.Dataset`` with a ``text`` column); the same texts
      and size give the same tokenizer, from the cache after the first time.
    * any other string: ``AutoTokenizer.from_pretrained`` of that hub id or folder;
    * ``None`` (the ``pretrained`` model block's default): the tokenizer saved with the model at ``path``.

    ``len(tokenizer)`` is the vocabulary size the model's embedding needs.
    """
    name = getattr(model_params, "tokenizer", None)
    if name == "bpe":
        from transformers import PreTrainedTokenizerFast

        vocab_size = getattr(model_params, "vocab_size", None) or _model_vocab_size(model_params)
        train = bpe_sample(train)
        key = bpe_cache_key(train, vocab_size)
        folder = build_once("tokenizers", key, lambda tmp: train_bpe(train, vocab_size, tmp), cache_root=cache_dir)
        return _ensure_special_tokens(PreTrainedTokenizerFast.from_pretrained(str(folder)), "bpe")

    from transformers import AutoTokenizer

    name_or_path = name if name is not None else getattr(model_params, "path", None)
    if not name_or_path:
        raise ConfigError("model.tokenizer: no tokenizer named and the model block has no path")
    kwargs = {}
    if getattr(model_params, "revision", None) and name is None:  # the revision belongs to the model's repo
        kwargs["revision"] = model_params.revision
    if getattr(model_params, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - OSError/ValueError, and `tokenizers`' own Exception for a bad file
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.tokenizer: cannot load tokenizer '{name_or_path}': {message}") from None
    return _ensure_special_tokens(tokenizer, name_or_path)
