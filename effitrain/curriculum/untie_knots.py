"""``curriculum: untie_knots`` -- Untie the Knots (Tian et al. 2024, arXiv 2409.04774) for long-context continued
pre-training.

The training rows are rebuilt from the documents by :func:`effitrain.data.knots.knotted_rows`: chunks of several
documents shuffled into one sequence, each chunk under a random id, and after a document's last chunk a summary of
its ids in the original order (the tracing task).  The rows are cached by content and parameters; training shuffles
them each epoch like ``curriculum: shuffle``, and a hook writes the labels at ``batch_start`` (-100 on the headers,
on the summary openers and on the first token after a header or a summary, as the authors' loss mask).

Sequence parallelism (``parallelism.sequence_parallel_size``, DeepSpeed-Ulysses): a knotted row is one sequence of
exactly ``dataset.seq_len`` tokens, which Ulysses splits into ``sp`` contiguous slices; inside attention each process
sees the whole sequence for its heads, so a summary can still attend to chunks that sit in another process's slice.
What it needs is what every Ulysses run needs -- ``seq_len`` divisible by ``sp`` (checked at ``effitrain check``,
``config/blocks/sequence_parallel.py``) -- and the labels are written before the objective slices the batch, so each
slice carries its own part of the mask.  The state is the shuffle sampler's (epoch, position).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from effitrain.curriculum.meco import training_labels
from effitrain.curriculum.samplers import ShuffleSampler
from effitrain.engine.events import Hook
from effitrain.registry import ConfigError

_VERSION = 1  # bump when the knotted rows built from the same inputs change


def knotted(documents: Any, tokenizer: Any, seq_len: int, *, chunks_per_doc: int, knot_probability: float,
            preserve_partial_order: bool, seed: int, cache_root: Optional[str] = None) -> dict[str, np.ndarray]:
    """The knotted rows of ``documents`` (their ``text``) and their tables, cached under ``<cache>/untie_knots``."""
    from effitrain.data.cache import ContentHash, dataset_content_hash
    from effitrain.data.knots import Markers, knotted_rows
    from effitrain.data.packing import tokenizer_fingerprint
    from effitrain.data.repack import cached_arrays, tokenize_documents

    key = ContentHash("untie_knots", _VERSION, dataset_content_hash(documents, ("text", "domain")),
                      tokenizer_fingerprint(tokenizer), seq_len, chunks_per_doc, knot_probability,
                      preserve_partial_order, seed).hexdigest()

    def build() -> dict[str, np.ndarray]:
        built = knotted_rows(tokenize_documents(documents["text"], tokenizer), seq_len,
                             markers=Markers.of(tokenizer), chunks_per_doc=chunks_per_doc,
                             knot_probability=knot_probability, preserve_partial_order=preserve_partial_order,
                             pad_id=tokenizer.eos_token_id, seed=seed)
        built["domain"] = np.asarray(documents["domain"], dtype=str)[np.maximum(built["first_doc"], 0)]
        return built

    return cached_arrays("untie_knots", key, build, cache_root=cache_root)


class KnotLabels(Hook):
    """At ``batch_start``: labels of -100 where the knotted rows' mask says the token is no target."""

    name = "untie_knots"

    def __init__(self, sampler: "UntieKnotsSampler") -> None:
        self.sampler = sampler

    def on_batch_start(self, state: Any) -> None:
        mask = self.sampler.mask[np.asarray(self.sampler.last_batch, dtype=np.int64)]
        state.batch = {**state.batch, "labels": training_labels(state.batch["input_ids"], mask)}


class UntieKnotsSampler(ShuffleSampler):
    """Shuffled knotted rows (``train_rows``, which the loop gathers from) with their label hook."""

    def __init__(self, built: dict[str, np.ndarray], **layout: Any) -> None:
        self.train_rows = built["rows"]
        self.mask = built["mask"]
        self.domains = built["domain"]
        self.knotted = built["knotted"]
        super().__init__(len(self.train_rows), **layout)
        self.last_batch: list[int] = []
        self.hook = KnotLabels(self)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            self.last_batch = batch
            yield batch


def build_untie_knots(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                      world_size: int, rank: int, documents: Any = None, tokenizer: Any = None) -> UntieKnotsSampler:
    """The ``curriculum: untie_knots`` builder (``packed`` gives the sequence length; the rows are rebuilt)."""
    if getattr(packed, "packed_order", None) == "untie_knots":  # token shards knotted by the data engine
        built = {"rows": packed.rows, "mask": packed.row_mask(), "domain": packed.domains(),
                 "knotted": packed.knotted()}
    else:
        if documents is None or tokenizer is None:
            raise ConfigError("curriculum: 'untie_knots' needs the training documents and the tokenizer")
        seq_len = int(packed.features["input_ids"].length)
        built = knotted(documents, tokenizer, seq_len, chunks_per_doc=params.chunks_per_doc,
                        knot_probability=params.knot_probability,
                        preserve_partial_order=params.preserve_partial_order, seed=seed)
    return UntieKnotsSampler(built, seed=seed, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                             world_size=world_size, rank=rank)
