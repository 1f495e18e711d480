"""``curriculum: meco`` -- metadata conditioning then cool-down (Gao et al. 2025, arXiv 2501.01956).

What the model is trained on
----------------------------
Two packings of the same training documents exist from the start:

* the *conditioned* rows: every document is ``tokenize(prefix + metadata + suffix) + tokenize(text) + EOS``
  (the paper: ``"URL: en.wikipedia.org\\n\\n"`` before each document; ``metadata_field`` picks the documents'
  column, the demo corpus has its ``domain``), packed per domain like the standard rows and cached by content;
* the *plain* rows: the run's standard packing (``packed``), unchanged.

Steps in the timeline phase ``cooldown_phase`` draw plain rows, every other step conditioned rows, so the switch
happens exactly at the phase's first step (``effitrain plan`` shows it).  Nothing is re-packed mid-run: the loop
gathers from both arrays through :class:`~effitrain.data.shards.ShardRows` (conditioned rows first).

The loss on metadata tokens is masked, as the authors' packer does with ``--add_metadata_mask`` (their
``data.py``: ``labels[~mask] = -100``; a row whose every token is metadata keeps its last 10 labels so the loss is
defined).  :class:`MetadataLossMask`, the sampler's hook, writes those labels at ``batch_start``.  Evaluation is on
plain eval rows, as the paper evaluates (without metadata).

Order and resuming
------------------
Each variant has its own stream: a permutation per epoch from ``default_rng([seed, variant, epoch])``, laid out
like every curriculum's (``samplers`` module docstring), advanced only by the steps of that variant.  The state is
the micro-batches taken in total and from each stream; a resumed run continues both streams where they stopped
(with another split of the same global batch -- world size, micro-batch size -- through the sequences consumed).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from effitrain.curriculum.samplers import ResumableBatchSampler
from effitrain.engine.events import Hook
from effitrain.registry import ConfigError, choices_text

VARIANTS = ("conditioned", "plain")
_VERSION = 1  # bump when the conditioned packing changes, so old caches are not reused
#: the authors' fallback for a row with no target token: train on its last 10 tokens (their data.py)
_ALL_MASKED_KEEP = 10


def conditioned_rows(documents: Any, tokenizer: Any, seq_len: int, *, metadata_field: str, prefix: str,
                     suffix: str, cache_root: Optional[str] = None) -> dict[str, np.ndarray]:
    """The conditioned packing: ``rows``, ``mask`` (False on metadata tokens), ``domain`` per row (cached)."""
    from effitrain.data.cache import ContentHash, dataset_content_hash
    from effitrain.data.packing import tokenizer_fingerprint
    from effitrain.data.repack import cached_arrays, pack_stream, tokenize_documents
    from effitrain.data.sources import domain_indices

    if metadata_field not in documents.column_names:
        raise ConfigError(f"curriculum.metadata_field: the training documents have no column '{metadata_field}'; "
                          f"valid: {choices_text(documents.column_names)}")
    key = ContentHash("meco", _VERSION, dataset_content_hash(documents, ("text", "domain", metadata_field)),
                      tokenizer_fingerprint(tokenizer), seq_len, metadata_field, prefix, suffix).hexdigest()

    def build() -> dict[str, np.ndarray]:
        texts = documents["text"]
        metadata = [f"{prefix}{value}{suffix}" for value in documents[metadata_field]]
        text_ids = tokenize_documents(texts, tokenizer)
        meta_ids = [ids[:-1] for ids in tokenize_documents(metadata, tokenizer)]  # without the end-of-text token
        rows, masks, domains = [], [], []
        for domain, doc_rows in domain_indices(documents).items():  # sorted domains, as the standard packing
            docs = [np.concatenate([meta_ids[i], text_ids[i]]) for i in doc_rows]
            doc_masks = [np.concatenate([np.zeros(len(meta_ids[i]), bool), np.ones(len(text_ids[i]), bool)])
                         for i in doc_rows]
            packed = pack_stream(docs, seq_len, masks=doc_masks)
            rows.append(packed["rows"])
            masks.append(packed["mask"])
            domains.append(np.full(len(packed["rows"]), domain))
        return {"rows": np.concatenate(rows), "mask": np.concatenate(masks),
                "domain": np.concatenate(domains).astype(str)}

    return cached_arrays("meco", key, build, cache_root=cache_root)


def training_labels(input_ids: Any, target_mask: np.ndarray) -> Any:
    """``input_ids`` with -100 where ``target_mask`` is False (a row with no target keeps its last 10 labels)."""
    import torch

    mask = np.array(target_mask, dtype=bool)  # a copy: the cached mask is read-only
    mask[~mask.any(axis=1), -_ALL_MASKED_KEEP:] = True
    keep = torch.from_numpy(mask).to(input_ids.device)
    return input_ids.masked_fill(~keep, -100)


class MetadataLossMask(Hook):
    """At ``batch_start``: labels of -100 on the metadata tokens of conditioned rows (the model's loss ignores
    them; the tokens stay in the input, which is what conditions the model)."""

    name = "meco"

    def __init__(self, sampler: "MecoSampler") -> None:
        self.sampler = sampler

    def on_batch_start(self, state: Any) -> None:
        mask = self.sampler.target_mask(self.sampler.last_batch)
        if mask is not None:
            state.batch = {**state.batch, "labels": training_labels(state.batch["input_ids"], mask)}


class MecoSampler(ResumableBatchSampler):
    def __init__(self, conditioned: dict[str, np.ndarray], plain_rows: np.ndarray, timeline: Any, *,
                 cooldown_phase: str, mask_metadata_loss: bool, seed: int, micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int) -> None:
        from effitrain.data.shards import ShardRows

        # the two packings seen as one index space, without copying either
        self.train_rows = ShardRows([conditioned["rows"], plain_rows], plain_rows.shape[1])
        super().__init__(len(self.train_rows), seed=seed, micro_batch_size=micro_batch_size,
                         grad_accum=grad_accum, world_size=world_size, rank=rank)
        self.sizes = (len(conditioned["rows"]), len(plain_rows))
        for variant, size in zip(VARIANTS, self.sizes):
            if size < self.global_batch_size:
                raise ConfigError(f"curriculum: MeCo's {variant} rows ({size} sequences) are fewer than one global "
                                  f"batch ({self.global_batch_size}); lower the batch size or add data")
        self.mask = conditioned["mask"]
        self.timeline = timeline
        self.cooldown_phase = cooldown_phase
        self.mask_metadata_loss = mask_metadata_loss
        self.micro = 0                          # micro-batches this rank has taken since the start
        self.drawn = [0, 0]                     # ... of them from each variant's stream
        self.last_batch: list[int] = []         # the rows (``train_rows`` indices) of the micro-batch handed out last
        self.hook = MetadataLossMask(self)

    # -- the schedule ------------------------------------------------------------------------------------------
    def variant(self, step: int) -> int:
        """0 (conditioned) before the cool-down phase, 1 (plain) inside it."""
        return int(self.timeline.phase(step) == self.cooldown_phase)

    def stream_batch(self, variant: int, count: int) -> list[int]:
        """Micro-batch ``count`` of a variant's stream (rank-local), as ``train_rows`` indices."""
        per_epoch = (self.sizes[variant] // self.global_batch_size) * self.grad_accum
        epoch, position = divmod(count, per_epoch)
        order = self._variant_order(variant, epoch)
        start = (position * self.world_size + self.rank) * self.micro_batch_size
        offset = 0 if variant == 0 else self.sizes[0]
        return (order[start:start + self.micro_batch_size] + offset).tolist()

    def _variant_order(self, variant: int, epoch: int) -> np.ndarray:
        key = (variant, epoch)
        if self._cached_epoch != key:  # one permutation kept (the base class's cache slot, keyed by variant too)
            self._cached_epoch = key
            self._cached_order = np.random.default_rng([self.seed % 2**63, variant, epoch]).permutation(
                self.sizes[variant])
        return self._cached_order

    def target_mask(self, batch: list[int]) -> Optional[np.ndarray]:
        """The loss mask of ``batch`` (True = trained on), or None when no row of it carries metadata."""
        idx = np.asarray(batch, dtype=np.int64)
        conditioned = idx < self.sizes[0]
        if not self.mask_metadata_loss or not conditioned.any():
            return None
        mask = np.ones((len(idx), self.train_rows.shape[1]), dtype=bool)
        mask[conditioned] = self.mask[idx[conditioned]]
        return mask

    # -- iteration and state -----------------------------------------------------------------------------------
    @property
    def micro_batches_seen(self) -> int:
        return self.micro

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            variant = self.variant(self.micro // self.grad_accum)
            batch = self.stream_batch(variant, self.drawn[variant])
            self.micro += 1  # counted before the yield: state_dict() between batches is always up to date
            self.drawn[variant] += 1
            self.last_batch = batch
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"micro": self.micro, "drawn": dict(zip(VARIANTS, self.drawn)), "sizes": list(self.sizes),
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "drawn" not in state or sorted(state["drawn"]) != sorted(VARIANTS):
            raise ConfigError("resume: the checkpoint was written by another curriculum than 'meco'; resume with "
                              "the run's own curriculum")
        if list(state["sizes"]) != list(self.sizes):
            raise ConfigError(f"resume: the checkpoint's MeCo sampler counted {state['sizes']} (conditioned, plain) "
                              f"rows, this run has {list(self.sizes)}; the data changed")
        # Another split of the same global batch (world size, micro-batch size) continues through the number of
        # sequences consumed, as the other samplers do.
        old_per_micro = state["micro_batch_size"] * state["world_size"]
        new_per_micro = self.micro_batch_size * self.world_size
        counts = [int(state["micro"])] + [int(state["drawn"][v]) for v in VARIANTS]
        if old_per_micro * state["grad_accum"] != self.global_batch_size or \
                any(c * old_per_micro % new_per_micro for c in counts):
            raise ConfigError(f"resume: the checkpoint's batch layout (micro_batch_size {state['micro_batch_size']}, "
                              f"grad_accum {state['grad_accum']}, world size {state['world_size']}) cannot be "
                              f"continued by this run's ({self.micro_batch_size}, {self.grad_accum}, "
                              f"{self.world_size}): the global batch or the point inside a step differs")
        self.micro, *self.drawn = [c * old_per_micro // new_per_micro for c in counts]

    def __repr__(self) -> str:
        return f"MecoSampler(rows={self.sizes}, micro={self.micro}, drawn={self.drawn})"


def build_meco(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
               rank: int, timeline: Any = None, documents: Any = None, tokenizer: Any = None) -> MecoSampler:
    """The ``curriculum: meco`` builder: the conditioned packing of ``documents`` next to the standard ``packed``."""
    from effitrain.data.packing import to_numpy

    phases = [name for name, _, _ in timeline.phases] if timeline is not None else []
    if params.cooldown_phase not in phases:
        raise ConfigError(f"curriculum.cooldown_phase: '{params.cooldown_phase}' is not a phase of "
                          f"timeline.phases (declared: {choices_text(phases) or 'none'}); declare it, e.g. "
                          f"{{unit: fraction, intervals: {{{params.cooldown_phase}: [0.9, 1.0]}}}}")
    plain = to_numpy(packed)
    # token shards built for this curriculum (data.executor) hold the conditioned rows beside the plain ones
    conditioned = packed.conditioned() if hasattr(packed, "conditioned") else None
    if conditioned is None:
        if documents is None or tokenizer is None:
            raise ConfigError("curriculum: 'meco' needs the training documents and the tokenizer")
        conditioned = conditioned_rows(documents, tokenizer, plain.shape[1], metadata_field=params.metadata_field,
                                       prefix=params.prefix, suffix=params.suffix)
    return MecoSampler(conditioned, plain, timeline, cooldown_phase=params.cooldown_phase,
                       mask_metadata_loss=params.mask_metadata_loss, seed=seed, micro_batch_size=micro_batch_size,
                       grad_accum=grad_accum, world_size=world_size, rank=rank)
