"""The ``struct_tuning`` recipe (Liu et al., 2407.16724) and its rollout: title each chunk of a passage, then the
passage from its chunks' titles (its knowledge tree), then SCPT's texts (each chunk after the tree with its own
branch marked) or SSFT's (exam questions about marked chunks, answered through the tree).

The rollout is driven through the stage's own chunk maker with a scripted generator, so every round's prompts and
every row are checked exactly; the recipe test composes the real recipe.
"""

from __future__ import annotations

import re

import pytest

from conftest import TINY
from test_synthesis_recipes import Scripted, _params

# two passages: the first cuts into three sections of at most 17 words, the second into one
LONG = ("Lists hold items in order and grow at the end. Slicing copies a part of a list. "
        "Dictionaries map keys to values by hashing. A missing key raises KeyError. "
        "Sets keep unique items only. Their union joins two sets.")
SHORT = "Tuples are fixed sequences of items."
DOCS = [{"id": "0", "text": LONG, "domain": "prose"}, {"id": "1", "text": SHORT, "domain": "prose"}]


@pytest.fixture(autouse=True, scope="module")
def _blocks():
    from effitrain.config.blocks import load_builtin_blocks

    load_builtin_blocks()


def _rollout(**over):
    params = _params({"name": "struct_tuning", "chunk_words": 17, "title_words": 4, **over})
    rollout = params.rollout_block.build()
    rollout.bind(DOCS)
    return params, rollout


def _content(prompt: str) -> str:
    return prompt.split("Content:\n", 1)[1].split("\n\nWrite the summary", 1)[0]


def _titler(question_answer=None):
    """Titles: 'Sure! Here it is: "T <first two words>"' for a chunk; 'F <first title>' for a passage (its content
    is its chunks' titles joined); questions: ``question_answer(prompt)``."""
    def reply(request, _):
        prompt = request.prompt
        if prompt.endswith("Summary:"):
            content = _content(prompt)
            if content.startswith("T "):
                return [f" F {content.split('.')[0]}\nmore words that are no title"]
            return [f' Sure! Here it is: "T {" ".join(content.split()[:2])}."']
        return [question_answer(prompt) if question_answer else " nothing in the format"]
    return reply


def test_titles_are_parsed_like_the_authors_scope():
    from effitrain.generation.structure import parse_title

    assert parse_title('Sure, here is the summary:\n"List operations in Python"', 8) == "List operations in Python"
    assert parse_title("  \n Hash maps: keys, values.\nsecond line", 8) == "Hash maps keys values"
    assert parse_title("one two three four five six seven eight nine", 8).split()[-1] == "eight"
    assert parse_title(" \n \n", 8) is None
    assert parse_title(" - ' _\nthe second line", 8) is None           # no letter or digit: no title


def test_questions_are_parsed_from_the_three_parts_and_refused_without_an_answer():
    from effitrain.generation.structure import parse_question

    assert parse_question(" Which error does a missing key raise?\n# Answer\nKeyError\n# Explanation\nA "
                          "lookup fails.") == ("Which error does a missing key raise?", "KeyError", "A lookup fails.")
    assert parse_question("What is a set?\n# Answer\nUnique items") == ("What is a set?", "Unique items", "")
    assert parse_question("What is a set? Unique items, and so on.") is None
    assert parse_question("\n# Answer\nKeyError") is None


def test_corpus_titles_every_section_then_its_passage_once_and_puts_each_section_under_its_marked_branch():
    from effitrain.generation.cache import NoCache
    from effitrain.generation.synthesis import _make_chunk

    params, rollout = _rollout(product="corpus")
    sections = rollout.pieces(LONG)
    assert [len(s.split()) <= 17 for s in sections] == [True] * 3 and len(sections) == 3
    assert " ".join(sections) == LONG
    gen = Scripted(params.generator_block.params, _titler())
    stats, rows = _make_chunk(DOCS, rollout, gen, NoCache(), params)
    prompts = [r.prompt for r in gen.sent]
    # round 1: one title per section (4), round 2: one passage title per passage (2), each sent once
    assert len(prompts) == 6 and stats["sent"] == 6
    assert [_content(p) for p in prompts[:4]] == [*sections, SHORT]
    titles = [f"T {' '.join(s.split()[:2])}" for s in sections]
    assert _content(prompts[4]) == ". ".join(titles)           # the passage is summarised from its titles, in order
    assert _content(prompts[5]) == "T Tuples are"
    by_variant = {}
    for row in rows:
        by_variant.setdefault((row["source_id"], row["variant"]), []).append(row)
    assert sorted(by_variant) == [("0", "field"), ("0", "mindmap"), ("1", "field"), ("1", "mindmap")]
    assert len(rows) == 3 + 1 + 1 + 1 and len({r["id"] for r in rows}) == len(rows)
    field = f"F {titles[0]}"
    for i, (row, section) in enumerate(zip(by_variant[("0", "field")], sections)):
        text = row["text"]
        assert text.endswith(section) and f"`{field}`" in text and f"`{titles[i]}`" in text
        tree = [line for line in text.splitlines() if line.startswith(("├─ ", "└─ "))]
        assert [line[3:].strip("*") for line in tree] == titles          # every branch, in the passage's order
        assert [line[3:].startswith("**") for line in tree] == [j == i for j in range(3)]  # only its own marked
    (mindmap,) = by_variant[("0", "mindmap")]
    assert field in mindmap["text"] and "**" not in mindmap["text"]
    assert mindmap["text"].splitlines()[-3:] == ["├─ " + titles[0], "├─ " + titles[1], "└─ " + titles[2]]
    assert {r["domain"] for r in rows} == {"prose_syn"}


def test_qa_asks_questions_about_drawn_sections_and_answers_through_the_tree(tmp_path):
    from effitrain.generation.cache import RequestCache
    from effitrain.generation.synthesis import _make_chunk

    def answer(prompt):
        shown = prompt.split("The text of the marked section(s):\n\n", 1)[1].split("\n\nWrite ", 1)[0]
        return f" What does {shown.split()[0]} do?\n# Answer\nit works\n# Explanation\nBecause it does."

    cache = RequestCache(tmp_path)
    params, corpus = _rollout(product="corpus")
    first = Scripted(params.generator_block.params, _titler(answer))
    _make_chunk(DOCS, corpus, first, cache, params)
    params, rollout = _rollout(product="qa", questions=3, max_sections=2)
    gen = Scripted(params.generator_block.params, _titler(answer))
    stats, rows = _make_chunk(DOCS, rollout, gen, cache, params)
    # the titles of both rounds are the corpus stage's (cached): only the questions are sent
    assert stats["cached"] == 6 and [r.prompt.endswith("# Question\n") for r in gen.sent] == [True] * stats["sent"]
    assert stats["sent"] == len({r.key for r in gen.sent}) == 2 * 3     # 3 questions per passage
    sections = rollout.pieces(LONG)
    chosen = [rollout.chosen_sections(sections[0], k) for k in range(3)]
    assert chosen == [rollout.chosen_sections(sections[0], k) for k in range(3)]   # drawn with the seed
    assert all(1 <= len(c) <= 2 and c == sorted(set(c)) for c in chosen)
    asked = []
    for request in gen.sent:
        tree = [line for line in request.prompt.splitlines() if line.startswith(("├─ ", "└─ "))]
        if len(tree) != 3:
            continue  # the one-section passage's
        marked = [i for i, line in enumerate(tree) if line[3:].startswith("**")]
        asked.append(marked)
        # the marked sections' texts are shown, the others' not
        assert [sections[i] in request.prompt for i in range(3)] == [i in marked for i in range(3)]
    assert sorted(asked) == sorted(chosen)                # one request per question, a repeated draw too
    structure = [r for r in rows if r["variant"] == "mindmap"]
    assert [r["source_id"] for r in structure] == ["0", "1"]
    assert structure[0]["text"].startswith("Question: What is the knowledge structure of F T Lists hold?")
    questions = [r for r in rows if r["variant"].startswith("qa")]
    assert len(questions) == 3 + 3
    # the one-section passage draws the same section three times: asked again under new keys, not answered once
    repeats = [r for r in gen.sent if r.prompt.endswith("# Question\n") and "─ **T Tuples are**" in r.prompt]
    assert len(repeats) == 3 and len({r.key for r in repeats}) == 3 and len({r.prompt for r in repeats}) == 1
    for row in questions:
        answer_part = row["text"].split("\nAnswer: ", 1)[1]
        assert row["text"].startswith("Question: Regarding F T ")
        # SSFT's order: the knowledge structure, then the explanation, then the short answer
        assert answer_part.startswith("Here is the knowledge structure of F T ")
        assert answer_part.index("└─ ") < answer_part.index("Because it does.") < answer_part.index("it works")
        assert "**" not in answer_part
    cache.close()


def test_questions_without_the_format_are_dropped_and_the_structure_question_stays():
    from effitrain.generation.cache import NoCache
    from effitrain.generation.synthesis import _make_chunk

    params, rollout = _rollout(product="qa", questions=2)
    gen = Scripted(params.generator_block.params, _titler())
    stats, rows = _make_chunk(DOCS, rollout, gen, NoCache(), params)
    assert [r["variant"] for r in rows] == ["mindmap", "mindmap"]
    questions = [r for r in gen.sent if r.prompt.endswith("# Question\n")]
    assert stats["sent"] == 4 + 2 + 2 * 2 and len(questions) == 2 * 2   # asked, none parsed
    titles = [f"T {' '.join(s.split()[:2])}" for s in rollout.pieces(LONG)]
    tree = "\n".join([f"F {titles[0]}", *("├─ " + t for t in titles[:-1]), "└─ " + titles[-1]])
    assert rows[0]["text"] == f"Question: What is the knowledge structure of F {titles[0]}?\nAnswer: {tree}"


def test_n_above_one_is_refused():
    from effitrain.registry import ConfigError

    with pytest.raises(ConfigError, match=r"generator.n: struct_tuning reads one answer per request"):
        _params({"name": "struct_tuning"}, n=2)


def test_the_recipe_trains_scpt_on_the_structured_corpus_then_ssft_on_the_questions():
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.plan import plan_sections

    composed = compose_config(["+recipe=struct_tuning", *TINY])
    spec = validate(composed.cfg, composed.recipes)
    names = [stage["name"] for stage in composed.cfg["stages"]]
    assert names == ["base", "structure", "questions", "scpt", "ssft"]
    structure, questions = spec.stage_specs[1].synthesis, spec.stage_specs[2].synthesis
    assert structure.rollout_block.params.product == "corpus" and questions.rollout_block.params.product == "qa"
    # one generator for both stages: the second finds the first's titles in the request cache
    assert structure.generator == questions.generator
    assert spec.stage_specs[3].block("dataset").params.synthetic == ["<dataset of stage structure>"]
    assert spec.stage_specs[4].block("dataset").params.synthetic == ["<dataset of stage questions>"]
    sections = plan_sections(composed.cfg, composed.recipes)
    corpus, qa = sections[1].counts, sections[2].counts
    assert corpus["requests"] == corpus["pieces"] and corpus["follow_ups"] == corpus["documents"]
    assert qa["follow_ups"] == qa["documents"] * (1 + questions.rollout_block.params.questions)
