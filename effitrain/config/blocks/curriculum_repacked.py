"""Curricula that re-pack the training documents: MeCo's metadata conditioning and In-Context Pretraining's chains
of related documents (their rows are built from the documents and cached; see ``effitrain/data/repack.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from effitrain.config.rules import rule
from effitrain.registry import param, register


@register("curriculum", "meco", builder="effitrain.curriculum.meco:build_meco",
          summary="MeCo: each document prefixed by its metadata until the timeline's cool-down phase, then plain")
@dataclass
class MecoParams:
    needs_documents: ClassVar[bool] = True  # re-packs the documents with their metadata (data_engine's rules)
    cooldown_phase: str = param("cooldown", help="the timeline phase whose steps train on plain rows (the paper: "
                                                 "the last 10% of tokens)")
    metadata_field: Literal["domain", "id"] = param("domain", help="the documents' column prepended as metadata "
                                                                   "(the paper: the URL's domain)")
    prefix: str = param("URL: ", help="text before the metadata (the authors' --add_metadata_prefix)")
    suffix: str = param("\n\n", help="text between the metadata and the document")
    mask_metadata_loss: bool = param(True, help="no loss on metadata tokens (the authors' --add_metadata_mask)")

    def sharded_condition(self) -> tuple[str, str, str]:
        """The header the data engine writes before every train document of the conditioned rows (``data.executor``:
        ``(field, prefix, suffix)``)."""
        return (self.metadata_field, self.prefix, self.suffix)


@register("curriculum", "in_context", builder="effitrain.curriculum.in_context:build_in_context",
          summary="In-Context Pretraining: kNN chains of related documents packed into the same contexts")
@dataclass
class InContextParams:
    needs_documents: ClassVar[bool] = True  # chains the documents by similarity (data_engine's rules)
    # ... and has a sharded form: with data.executor the chains are built over the files and packed into token shards
    sharded_order: ClassVar[str] = "effitrain.curriculum.sharded_in_context:ShardedChains"
    neighbors: int = param(9, ge=1, help="k of the kNN graph (the authors walk knn[1:10]: 9 neighbours)")
    n_features: int = param(2**17, ge=16, help="hashed n-gram dimensions of the TF-IDF document vectors")
    embed_dims: int = param(128, ge=1, le=4096, help="dense dimensions of the document embeddings (a truncated "
                                                    "SVD of the TF-IDF vectors; the paper: 768-dim Contriever)")
    index: Literal["auto", "flat", "ivfpq"] = param("auto", help="the FAISS index of the kNN search: flat (exact), "
                                                   "ivfpq (the authors' IVF-PQ, scaled to the corpus) or auto "
                                                   "(flat up to 100k documents)")
    nprobe: int = param(32, ge=1, help="inverted lists an ivfpq search probes (the authors: 64 of 32768)")
    dedup_threshold: Optional[float] = param(0.85, ge=0, le=1, help="drop a document whose first 100 characters' "
                                             "3-gram Jaccard similarity with the previous one exceeds this; null "
                                             "keeps all")


@rule("meco_needs_its_cooldown_phase", "curriculum=meco switches to plain rows at the timeline phase it names")
def _meco_cooldown_phase(spec, env) -> Optional[str]:
    curriculum = spec.block("curriculum")
    if curriculum.name != "meco":
        return None
    timeline = spec.timeline
    phases = timeline.phases.intervals if timeline is not None and timeline.phases is not None else ()
    names = [name for name, _, _ in phases]
    if curriculum.params.cooldown_phase not in names:
        return (f"curriculum.cooldown_phase '{curriculum.params.cooldown_phase}' is not a phase of timeline.phases "
                f"(declared: {', '.join(names) or 'none'}); declare it, e.g. timeline.phases={{unit: fraction, "
                f"intervals: {{{curriculum.params.cooldown_phase}: [0.9, 1.0]}}}}")
    return None


@register("curriculum", "untie_knots", builder="effitrain.curriculum.untie_knots:build_untie_knots",
          summary="Untie the Knots: chunks of several documents shuffled into one sequence, with the tracing task")
@dataclass
class UntieKnotsParams:
    needs_documents: ClassVar[bool] = True  # re-packs the documents into knotted rows (data_engine's rules)
    chunks_per_doc: int = param(3, ge=1, help="pieces a document is cut into, of equal length (the authors' "
                                              "chunk_probs_cfg [[0, 0, 1]]: 3 pieces)")
    knot_probability: float = param(0.3, ge=0, le=1, help="share of the rows that are knotted; the others are "
                                                         "plain packing (the authors' chunk_probs_cfg weights "
                                                         "[0.7, 0.3])")
    preserve_partial_order: bool = param(False, help="keep each document's pieces in their order when shuffling "
                                                    "(the authors' option; off: the summary must recover the order)")

    def sharded_knots(self) -> tuple[int, float, bool]:
        """What the data engine knots the train rows with (``data.executor``; the run's seed is added)."""
        return (self.chunks_per_doc, self.knot_probability, self.preserve_partial_order)
