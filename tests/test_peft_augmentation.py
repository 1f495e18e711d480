"""The ``peft_augmentation`` recipe (Patwa et al., 2404.02422) and its rollout ``few_shot_augment``: generate new
examples of each class from a few-shot prompt of its real ones, keep those the model labels in context as the
class they were written for, LoRA-tune on real + synthetic 1:1.

The rollout is driven through the stage's own chunk maker with a scripted generator, so each round's prompts and
what the filter keeps are checked exactly; the mixture test draws the fine-tuning stage's batches.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import TINY
from test_synthesis_recipes import Scripted, _params

DOCS = [
    {"id": "0", "text": "The cat sat on the warm mat and looked at the quiet garden for hours.", "domain": "prose"},
    {"id": "1", "text": "A river runs through the old town where the market opens every morning.", "domain": "prose"},
    {"id": "2", "text": "Rain fell on the roofs of the village while the children slept soundly.", "domain": "prose"},
    {"id": "3", "text": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))", "domain": "code"},
    {"id": "4", "text": "def square(x):\n    return x * x\n\nvalues = [square(v) for v in range(3)]",
     "domain": "code"},
    {"id": "5", "text": "for i in range(10):\n    if i % 2:\n        print(i, 'is odd')", "domain": "code"},
]


@pytest.fixture(autouse=True, scope="module")
def _blocks():
    from effitrain.config.blocks import load_builtin_blocks

    load_builtin_blocks()


CLASS_LINE = re.compile(r'category "(\w+)"')


def _rollout(**over):
    params = _params({"name": "few_shot_augment", "per_example": 2, "shots": 2, "max_words": 12, "min_words": 3,
                      **over})
    rollout = params.rollout_block.build()
    rollout.bind(DOCS)
    return params, rollout


def _texts_of(prompt: str) -> list[str]:
    return [t.strip() for t in prompt.split("Text:")[1:-1]]


def test_generation_prompts_show_the_example_then_others_of_its_class_only():
    _, rollout = _rollout(shots=3)
    by_class = rollout.examples
    assert sorted(by_class) == ["code", "prose"] and all(len(v) == 3 for v in by_class.values())
    for doc in DOCS:
        (piece,) = rollout.pieces(doc["text"])
        asks = rollout.prompts(piece)
        assert [a.variant for a in asks] == ["generate0", "generate1"]
        for ask in asks:
            assert CLASS_LINE.search(ask.prompt).group(1) == doc["domain"]
            shown = _texts_of(ask.prompt)
            assert shown[0] == piece and len(shown) == 3 and len(set(shown)) == 3
            assert all(t in by_class[doc["domain"]] for t in shown)      # never an example of another class
            assert ask.prompt.endswith("Text:")
        assert rollout.prompts(piece) == asks                             # drawn with the seed: the same asks
    # with more examples than shots, the requests of one example draw different demonstrations
    _, wide = _rollout(shots=2, per_example=6)
    piece = wide.pieces(DOCS[0]["text"])[0]
    asks = wide.prompts(piece)
    assert len({a.prompt for a in asks}) == 2 and len({(a.prompt, a.attempt) for a in asks}) == 6


def test_answers_are_cut_at_the_next_example_and_labels_read_from_the_first_word():
    from effitrain.generation.augment import parse_candidate, parse_label

    assert parse_candidate(" A dog ran home fast.\n\nText: another one", 12, 3) == "A dog ran home fast."
    assert parse_candidate("one two", 12, 3) is None                     # under min_words
    assert parse_candidate(" ".join(map(str, range(30))), 12, 3).split() == [str(i) for i in range(12)]
    assert parse_label(" Code.\nText: x", ["code", "prose"]) == "code"
    assert parse_label(" prose", ["code", "prose"]) == "prose"
    assert parse_label(" the cat", ["code", "prose"]) is None
    assert parse_label("", ["code", "prose"]) is None


def _labeller(texts_by_kind):
    """Generations: a fixed new example per class; labels: 'code' for text with 'def', 'prose' for text with
    'the', nothing parseable otherwise."""
    def reply(request, _):
        prompt = request.prompt
        if prompt.endswith("Category:"):
            candidate = prompt.rsplit("Text:", 1)[1].rsplit("\nCategory:", 1)[0]
            return [" code" if "def" in candidate else " prose" if " the " in candidate else " 42"]
        label = CLASS_LINE.search(prompt).group(1)
        return [texts_by_kind[label] + "\n\nText: a further one"]
    return reply


@pytest.mark.parametrize("unparsed", ["drop", "keep"])
def test_the_icl_filter_keeps_candidates_labelled_as_their_class(unparsed):
    from effitrain.generation.cache import NoCache
    from effitrain.generation.synthesis import _make_chunk

    # prose examples get a candidate labelled code (dropped), code examples one that names no class
    texts = {"prose": "def f(): the wrong class here", "code": "x = 1 + 2 plus more"}
    params, rollout = _rollout(unparsed=unparsed)
    gen = Scripted(params.generator_block.params, _labeller(texts))
    stats, rows = _make_chunk(DOCS, rollout, gen, NoCache(), params)
    generations = [r for r in gen.sent if not r.prompt.endswith("Category:")]
    checks = [r for r in gen.sent if r.prompt.endswith("Category:")]
    assert len({(r.prompt, r.key) for r in generations}) == 6 * 2   # a repeated draw is asked under a new key
    assert 0 < len(checks) <= 6 * 2
    for check in checks:  # one real demonstration per class, each with its label, then the candidate
        labels = re.findall(r"\nCategory: (\w+)\n", check.prompt)
        assert sorted(labels) == ["code", "prose"]
    kept = {r["text"] for r in rows}
    assert "def f(): the wrong class here" not in kept                 # labelled code, written for prose
    assert (kept == {"x = 1 + 2 plus more"}) == (unparsed == "keep")
    assert all(r["domain"] == "code_syn" for r in rows)
    assert all(r["variant"].startswith("check:generate") for r in rows)


def test_candidates_labelled_as_intended_are_kept_once_per_generation_and_filter_none_keeps_all():
    from effitrain.generation.cache import NoCache
    from effitrain.generation.synthesis import _make_chunk

    texts = {"prose": "the sun rose over the hills", "code": "def g(y): return y"}
    params, rollout = _rollout()
    _, rows = _make_chunk(DOCS, rollout, Scripted(params.generator_block.params, _labeller(texts)), NoCache(),
                          params)
    # every generation request's candidate is checked and kept: 6 examples x 2 requests
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    assert {(r["domain"], r["text"]) for r in rows} == {("prose_syn", texts["prose"]), ("code_syn", texts["code"])}
    wrong = {"prose": "def h(): the wrong", "code": "def k(): pass and more"}
    params, rollout = _rollout(filter="none")
    gen = Scripted(params.generator_block.params, _labeller(wrong))
    _, rows = _make_chunk(DOCS, rollout, gen, NoCache(), params)
    assert len(rows) == 12 and not any(r.prompt.endswith("Category:") for r in gen.sent)


def test_n_above_one_is_refused_with_the_per_example_that_asks_as_much():
    from effitrain.registry import ConfigError

    with pytest.raises(ConfigError, match=r"generator.n: .* set n: 1 and rollout.per_example: 6"):
        _params({"name": "few_shot_augment", "per_example": 2}, n=3)


def test_the_finetune_stage_draws_real_and_synthetic_1_to_1_with_balanced_classes():
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.curriculum.mixture import MixtureSampler

    composed = compose_config(["+recipe=peft_augmentation", *TINY])
    spec = validate(composed.cfg, composed.recipes)
    finetune = spec.stage_specs[2]
    assert finetune.block("peft").name == "lora"
    assert finetune.block("dataset").params.synthetic == ["<dataset of stage augment>"]
    assert spec.stage_specs[1].synthesis.generator_block.params.model == "<final model of stage base>"
    timeline = finetune.timeline.resolve(max_steps=400, tokens_per_step=1)
    names = ["prose", "code", "arithmetic", "prose_aug", "code_aug", "arithmetic_aug"]
    labels = np.array([n for i, n in enumerate(names) for _ in range(6 + 4 * i)])  # uneven row counts
    sampler = MixtureSampler(labels, timeline, seed=0, micro_batch_size=8, grad_accum=1, world_size=1, rank=0)
    drawn = np.array(sampler.names)[np.concatenate([sampler.slot_domains(s) for s in range(400)])]
    synthetic = float(np.char.endswith(drawn.astype(str), "_aug").mean())
    assert abs(synthetic - 0.5) < 0.03, synthetic
    for name in names:
        assert abs(float((drawn == name).mean()) - 1 / 6) < 0.03, name


def test_plan_counts_the_generation_requests_and_one_label_per_generation():
    from effitrain.config.compose import compose_config
    from effitrain.plan import plan_sections

    # TINY's dataset.max_docs_per_domain would override the stages' own few examples per class
    composed = compose_config(["+recipe=peft_augmentation", *(o for o in TINY if "max_docs" not in o)])
    c = plan_sections(composed.cfg, composed.recipes)[1].counts
    assert c["documents"] == 30 and c["pieces"] == 30
    assert c["requests"] <= 3 * c["pieces"] and c["follow_ups"] == 3 * c["pieces"]
