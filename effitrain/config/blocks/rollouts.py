"""Rollouts of several steps (the ``rollout`` registry group; ``wrap`` is in :mod:`.synthesis`).

``entigraph``: EntiGraph (Yang et al., 2024, arXiv 2409.07431) -- the entities of a document, then texts about how
pairs and triples of them relate in it.  ``resample``: ITERTL's sampling step (Wu et al., 2024, arXiv 2407.12022) --
the model of the previous round continues the start of every reference document, several times, and the samples
nearest the reference are kept.  ``few_shot_augment``: few-shot augmentation for PEFT (Patwa et al., 2024, arXiv
2404.02422) -- new examples of each class from a prompt of its real ones, kept when the model's in-context label
agrees.  Torch-free schemas; the rollouts are in :mod:`effitrain.generation.entigraph`,
:mod:`effitrain.generation.resample` and :mod:`effitrain.generation.augment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from effitrain.registry import ConfigError, param, register


@register("rollout", "entigraph", builder="effitrain.generation.entigraph:build_entigraph",
          summary="EntiGraph (Yang et al., 2409.07431): extract a document's entities, then write how pairs and "
                  "triples of them relate in it")
@dataclass
class EntigraphParams:
    max_words: int = param(2000, ge=8, help="a longer document is cut into pieces of at most this many words at "
                                            "sentence ends, each prompted as a document of its own (the paper: "
                                            "whole QuALITY articles, ~5k tokens)")
    max_entities: int = param(20, ge=2, help="entities of a piece used at most (the first ones the answer lists)")
    singles: Optional[int] = param(0, ge=0, help="single entities per piece asked about (the authors' code has this "
                                                 "step, the paper's algorithm not); null: all")
    pairs: Optional[int] = param(10, ge=0, help="entity pairs per piece, drawn with the seed; null: every pair "
                                                "(the paper)")
    triples: Optional[int] = param(10, ge=0, help="entity triples per piece, drawn with the seed; null: every "
                                                  "triple (the paper: all of them shuffled, as many as its budget "
                                                  "reached)")
    seed: int = param(0, help="the draw of the pairs and triples (with the piece's text): the same seed, the same "
                              "requests")
    entity_retries: int = param(2, ge=0, help="the entity answer is asked again (a new seed) this many times when "
                                              "it holds no entity list (the paper retries until it does)")
    fallback: Literal["none", "terms"] = param("none", help="when no entity answer parses: none = the piece makes "
                                                            "no relation texts; terms = its most frequent content "
                                                            "words stand in for the entities (a generator too weak "
                                                            "to answer JSON, e.g. the CPU demo's)")
    summary_rows: bool = param(True, help="the summary of the entity answer is a training text too (the authors' "
                                          "corpus holds it)")
    min_words: int = param(3, ge=0, help="post-filter: a relation text with fewer words is dropped")

    def validate(self, path: str) -> None:
        if not any((self.singles is None or self.singles, self.pairs is None or self.pairs,
                    self.triples is None or self.triples)):
            raise ConfigError(f"{path}: singles, pairs and triples are all 0, so no relation text is asked for; "
                              f"the paper asks pairs and triples (e.g. pairs: 10, triples: 10)")

    def fan_out(self) -> int:
        return 1  # the first round: one entity request per piece; the relations follow from its answer


@register("rollout", "resample", builder="effitrain.generation.resample:build_resample",
          summary="ITERTL (Wu et al., 2407.12022): the previous round's model continues each reference's start n "
                  "times; the samples nearest the reference are kept")
@dataclass
class ResampleParams:
    prompt_words: int = param(16, ge=1, help="the start of a reference document the model continues")
    max_words: int = param(200, ge=8, help="a longer reference is cut into pieces of at most this many words at "
                                           "sentence ends, each continued on its own")
    keep: int = param(1, ge=1, help="samples kept per piece, the nearest to the reference first (of the generator's "
                                    "n): ITERTL's ranking by a score, reduced to keeping the best")
    min_score: float = param(0.0, ge=0, le=1, help="a kept sample's score (word-overlap F1 of its continuation with "
                                                   "the reference's) at least this")

    def fan_out(self) -> int:
        return 1

    def check_generator(self, generator: Any, path: str) -> None:
        if self.keep > generator.n:
            raise ConfigError(f"{path}.rollout.keep: keeps {self.keep} of the generator's n={generator.n} samples "
                              f"per piece; set generator.n >= {self.keep} (ITERTL ranks several samples per task)")


@register("rollout", "few_shot_augment", builder="effitrain.generation.augment:build_few_shot_augment",
          summary="Few-shot augmentation for PEFT (Patwa et al., 2404.02422): new examples of each class from a "
                  "few-shot prompt of its real ones, kept when the model's in-context label agrees")
@dataclass
class FewShotAugmentParams:
    per_example: int = param(2, ge=1, help="generation requests per real example, each with its own draw of "
                                           "demonstrations")
    shots: int = param(3, ge=1, help="real examples of the class in a generation prompt: the seeding example, then "
                                     "shots - 1 others of its class drawn with the seed (the paper: 4 per class)")
    max_words: int = param(60, ge=4, help="an example (real or generated) is cut to this many words, so that the "
                                          "prompts fit the generator's context")
    min_words: int = param(5, ge=1, help="post-filter: a generated example with fewer words is dropped")
    filter: Literal["icl", "none"] = param("icl", help="icl: the generator labels each new example from one real "
                                                       "demonstration per class and only examples labelled as "
                                                       "intended are kept (the paper); none: keep every parsed one")
    unparsed: Literal["drop", "keep"] = param("drop", help="a labelling answer that names no class: drop the "
                                                           "example (the paper) or keep it (a generator too weak "
                                                           "to answer in the format, e.g. the CPU demo's)")
    seed: int = param(0, help="the draws of the demonstrations")

    def fan_out(self) -> int:
        return self.per_example

    def check_generator(self, generator: Any, path: str) -> None:
        if generator.n != 1:
            raise ConfigError(f"{path}.generator.n: few_shot_augment asks one sample per request (per_example "
                              f"requests, each with its own demonstrations, make the variety); set n: 1 and "
                              f"rollout.per_example: {self.per_example * generator.n}")


@register("rollout", "struct_tuning", builder="effitrain.generation.structure:build_struct_tuning",
          summary="StructTuning (Liu et al., 2407.16724): title each chunk and its passage, then the chunks under "
                  "their knowledge tree (SCPT) or exam questions answered through the tree (SSFT)")
@dataclass
class StructTuningParams:
    product: Literal["corpus", "qa"] = param("corpus", help="corpus: SCPT's texts (each chunk after its passage's "
                                                            "mindmap, its branch marked; the mindmap alone); qa: "
                                                            "SSFT's (exam questions whose answers recite the "
                                                            "mindmap, then explain; the structure question)")
    chunk_words: int = param(200, ge=8, help="a passage is cut into chunks of at most this many words at sentence "
                                             "ends, one branch of its tree each (the authors: 1024 tokens at "
                                             "paragraph ends)")
    title_words: int = param(8, ge=1, help="a chunk's or passage's title: the generator's summary in at most this "
                                           "many words (the authors' eight)")
    questions: int = param(2, ge=1, help="product qa: exam questions asked per passage (the authors: 2)")
    max_sections: int = param(2, ge=1, help="product qa: a question is about 1 to this many of the passage's "
                                            "chunks, drawn with the seed (the authors: 1 or 2)")
    seed: int = param(0, help="the draws of the questions' chunks and of the corpus templates")

    def fan_out(self) -> int:
        return 1  # round one: one title request per chunk; the passage's title and the questions follow

    def check_generator(self, generator: Any, path: str) -> None:
        if generator.n != 1:
            raise ConfigError(f"{path}.generator.n: struct_tuning reads one answer per request (a title, a "
                              f"question); set n: 1 (more questions: rollout.questions)")
