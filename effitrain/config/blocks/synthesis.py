"""Synthesis stages (``synthesis:`` of a stage entry) and their rollouts (the ``rollout`` registry group).

A synthesis stage trains nothing: it maps the train split of the stage's ``dataset`` block through a rollout with
a generator and writes the result as a dataset that later stages train on (``dataset: "@stage:NAME"``, or
``dataset.synthetic: ["@stage:NAME"]`` beside real data, mixed by the mixture curriculum)::

    - name: rephrase
      synthesis:
        rollout: {name: wrap, styles: [medium]}
        generator: {backend: transformers, model: "@stage:base", temperature: 0.7, max_new_tokens: 128}
        max_documents: 64

A rollout builder is called as ``build(params)`` and returns an object with ``pieces(text) -> [str]`` (what one
document is cut into), ``prompts(piece) -> [(variant, prompt)]`` (the fan-out: one request per variant),
``rows(piece, ask, completions)`` (parse and post-filter) and ``follow_up(piece, answered)`` (the next round's
requests: EntiGraph's relation prompts follow from its entity answers); see :mod:`effitrain.generation.rollouts`.
A new method is a new registered rollout (``entigraph`` and ``resample``: :mod:`.rollouts`); the stage, the cache
and the backends stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from effitrain.config.blocks.generator import parse_generator
from effitrain.registry import REGISTRY, ConfigError, param, register

WRAP_STYLES = ("easy", "medium", "hard", "qa")


@register("rollout", "wrap", builder="effitrain.generation.rollouts:build_wrap",
          summary="WRAP (Maini et al., 2401.16380): rephrase each ~300-token piece of a document in a style")
@dataclass
class WrapParams:
    styles: list[Literal["easy", "medium", "hard", "qa"]] = param(
        default_factory=lambda: ["medium"], help="one request per style for every piece (the paper's four: easy, "
                                                 "medium (Wikipedia), hard, qa; its Fig. 1 uses qa)")
    max_words: int = param(225, ge=8, help="pieces of at most this many words, cut at sentence ends (the paper: "
                                           "~300 tokens with NLTK's sentence splitter; 225 words ~ 300 tokens)")
    min_words: int = param(3, ge=0, help="post-filter: a rephrase with fewer words is dropped")

    def validate(self, path: str) -> None:
        if not self.styles:
            raise ConfigError(f"{path}.styles: an empty list asks for nothing; valid: {', '.join(WRAP_STYLES)}")
        if len(set(self.styles)) != len(self.styles):
            raise ConfigError(f"{path}.styles: {self.styles} names a style twice")

    def fan_out(self) -> int:
        return len(self.styles)


@dataclass
class SynthesisParams:
    rollout: dict[str, Any] = param(help="the registered rollout: {name: wrap, ...}")
    generator: dict[str, Any] = param(default_factory=dict, help="{backend: transformers | vllm | openai, model, "
                                                                 "sampling ...}")
    max_documents: Optional[int] = param(256, ge=1, help="documents of the input's train split mapped (the first "
                                                         "ones in its order; null: all)")
    chunk_documents: int = param(16, ge=1, help="documents per chunk file: a killed stage keeps every finished "
                                                "chunk, and the request cache the answers of the chunk it was in")
    domain_suffix: str = param("synthetic", help="an output document's domain is '<its input domain>_<suffix>', "
                                                 "so a mixture can weigh it against its source")
    cache_requests: bool = param(True, help="answers cached by (model, sampling, prompt) in "
                                            "$EFFITRAIN_CACHE/generation: the same request is never sent twice")
    # filled by validate(): the typed blocks
    rollout_block: Any = field(default=None, init=False, repr=False)
    generator_block: Any = field(default=None, init=False, repr=False)

    def validate(self, path: str) -> None:
        self.rollout_block = REGISTRY.parse("rollout", self.rollout, f"{path}.rollout")
        if not self.generator:
            raise ConfigError(f"{path}.generator: required; give at least its model, e.g. {{backend: transformers, "
                              f"model: '@stage:NAME'}}")
        self.generator_block = parse_generator(self.generator, f"{path}.generator")
        fits = getattr(self.rollout_block.params, "check_generator", None)  # what a rollout needs of its generator
        if fits is not None:
            fits(self.generator_block.params, path)
        if not self.domain_suffix.replace("_", "a").replace("-", "a").isalnum():
            raise ConfigError(f"{path}.domain_suffix: expected letters, digits, '_' or '-', got "
                              f"{self.domain_suffix!r}")

    def check_inputs(self, path: str, *, spec: Any = None, deep: bool = False) -> None:
        self.generator_block.params.check_inputs(f"{path}.generator", spec=spec, deep=deep)

    def requests_per_piece(self) -> int:
        fan = getattr(self.rollout_block.params, "fan_out", None)
        return fan() if fan is not None else 1


def parse_synthesis(raw: Any, path: str) -> SynthesisParams:
    from effitrain.registry import _is_mapping, parse_params

    if not _is_mapping(raw):
        raise ConfigError(f"{path}: expected a mapping with a rollout and a generator, got {raw!r}")
    return parse_params(SynthesisParams, raw, path)
