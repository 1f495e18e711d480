"""The synthesis recipes of issue 25's second slice: EntiGraph (entities, then seeded relation requests over pairs
and triples), ITERTL's iterative resampling (round k's data from round k-1's model, mixed with the references), and
a synthesis stage stopped by SIGTERM (exit 75, resumable, nothing asked twice).

The rollouts are driven through the stage's own chunk maker (``_make_chunk``) with scripted generators, so what is
asked in each round is checked exactly; the pipeline tests run the real recipes on the tiny model.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY

HERE = Path(__file__).resolve().parent
DOC = ("Guido van Rossum created Python at CWI in Amsterdam. Python borrows from ABC, a teaching language built "
       "at CWI. The Zen of Python guides the design of Python.")


@pytest.fixture(autouse=True, scope="module")
def _blocks():
    from effitrain.config.blocks import load_builtin_blocks

    load_builtin_blocks()


def _params(rollout: dict, **generator) -> object:
    from effitrain.config.blocks.synthesis import SynthesisParams
    from effitrain.registry import parse_params

    return parse_params(SynthesisParams, {"rollout": rollout, "generator": {"model": "x", **generator},
                                          "domain_suffix": "syn"}, "s")


class Scripted:
    """A generator whose answers a test writes: ``reply(request, attempt_seen) -> [texts]``; it records every
    request it was sent, in order."""

    backend = "scripted"

    def __init__(self, params, reply) -> None:
        from effitrain.generation.backends import Generator

        self._base = Generator(params, "fp")
        self.params, self.reply, self.sent = params, reply, []

    def request(self, prompt, attempt=0):
        return self._base.request(prompt, attempt)

    def cache_scope(self):
        return self._base.cache_scope()

    def answer(self, requests, should_stop=lambda: False):
        from effitrain.generation.backends import Answer

        for r in requests:
            self.sent.append(r)
            yield [(r, Answer(tuple(self.reply(r, len(self.sent))), 1))]


def _entity_answer(entities, summary="A summary of the article about Python."):
    return "Sure! ```json\n" + json.dumps({"summary": summary, "entities": entities}) + "\n```"


ENTITIES = ["Guido van Rossum", "Python", "CWI", "Amsterdam", "ABC", "Zen of Python"]


# --------------------------------------------------------------------------------------------------- EntiGraph
def test_entigraph_asks_entities_then_seeded_pairs_and_triples_of_the_parsed_entities():
    from effitrain.generation.cache import NoCache
    from effitrain.generation.entigraph import relation_prompt
    from effitrain.generation.synthesis import _make_chunk

    params = _params({"name": "entigraph", "pairs": 4, "triples": 2, "max_entities": 5, "seed": 3})
    rollout = params.rollout_block.build()

    def reply(r, _):
        if "### Entities:" not in r.prompt:
            return [_entity_answer(ENTITIES + ["python"])]  # a duplicate spelling: one entity
        return [f"A text about {r.prompt.rsplit('### Entities:', 1)[1].strip()} in the article."]

    gen = Scripted(params.generator_block.params, reply)
    stats, rows = _make_chunk([{"id": "d", "text": DOC, "domain": "prose"}], rollout, gen, NoCache(), params)
    first, relations = gen.sent[0], gen.sent[1:]
    assert "### Document Content:\n" + DOC in first.prompt and '"entities"' in first.prompt
    assert len(relations) == 4 + 2 and stats["sent"] == 7 and stats["pieces"] == 1
    used = ENTITIES[:5]  # max_entities: the first five the answer lists
    asked = [r.prompt for r in relations]
    pairs = [s for s in itertools.combinations(range(5), 2) if relation_prompt(DOC, [used[i] for i in s]) in asked]
    triples = [s for s in itertools.combinations(range(5), 3) if relation_prompt(DOC, [used[i] for i in s]) in asked]
    assert len(pairs) == 4 and len(triples) == 2  # every request is a distinct subset of the parsed entities
    # the rows: the summary and the six relation texts, with the subset in the id
    assert [r["variant"] for r in rows][0] == "entities" and rows[0]["text"] == "A summary of the article about Python."
    assert sorted(r["variant"] for r in rows[1:]) == sorted(
        [f"pair:{a},{b}" for a, b in pairs] + [f"triple:{a},{b},{c}" for a, b, c in triples])
    assert {r["domain"] for r in rows} == {"prose_syn"}

    # the same seed draws the same subsets; another seed other ones (C(5,2) = 10 pairs: 4 drawn)
    again = Scripted(params.generator_block.params, reply)
    _make_chunk([{"id": "d", "text": DOC, "domain": "prose"}], rollout, again, NoCache(), params)
    assert [r.prompt for r in again.sent] == [r.prompt for r in gen.sent]
    other = _params({"name": "entigraph", "pairs": 4, "triples": 2, "max_entities": 5, "seed": 4})
    moved = Scripted(other.generator_block.params, reply)
    _make_chunk([{"id": "d", "text": DOC, "domain": "prose"}], other.rollout_block.build(), moved, NoCache(), other)
    assert {r.prompt for r in moved.sent[1:]} != set(asked)
    # null: every pair (the paper's loop), no triples
    every = _params({"name": "entigraph", "pairs": None, "triples": 0, "max_entities": 5})
    full = Scripted(every.generator_block.params, reply)
    _make_chunk([{"id": "d", "text": DOC, "domain": "prose"}], every.rollout_block.build(), full, NoCache(), every)
    assert len(full.sent) == 1 + math.comb(5, 2)


def test_an_entity_answer_that_does_not_parse_is_asked_again_under_a_new_key_then_falls_back():
    from effitrain.generation.cache import NoCache
    from effitrain.generation.entigraph import document_terms
    from effitrain.generation.synthesis import _make_chunk

    def never_json(r, _):
        return ["entities are python and guido"]

    for fallback, relations in (("none", 0), ("terms", 3)):
        params = _params({"name": "entigraph", "pairs": 3, "triples": 0, "entity_retries": 2, "fallback": fallback,
                          "max_entities": 3})
        gen = Scripted(params.generator_block.params, never_json)
        stats, rows = _make_chunk([{"id": "d", "text": DOC, "domain": "prose"}], params.rollout_block.build(), gen,
                                  NoCache(), params)
        tries = gen.sent[:3]
        assert len({r.prompt for r in tries}) == 1 and len({r.key for r in tries}) == 3  # the same prompt, new keys
        assert len({r.seed for r in tries}) == 3 and len(gen.sent) == 3 + relations
    # terms: the most frequent content words, first spelling, ties in order of appearance
    assert document_terms(DOC, 4) == ["Python", "Guido", "Rossum", "created"]
    terms = document_terms(DOC, 3)
    for r in gen.sent[3:]:  # the relation requests of the fallback name two of the three terms each
        named = r.prompt.rsplit("### Entities:", 1)[1].split("\nASSISTANT:")[0].split("\n- ")[1:]
        assert len(named) == 2 and {n.strip() for n in named} <= set(terms)
    assert len(rows) == 3 and {r["variant"].split(":")[0] for r in rows} == {"pair"}

    # a retry that parses: its answer's entities are used, its summary row carries the attempt in its id
    def second_time_lucky(r, count):
        return ["no json here"] if count == 1 else [_entity_answer(ENTITIES[:3])]

    params = _params({"name": "entigraph", "pairs": None, "triples": None, "entity_retries": 1})
    gen = Scripted(params.generator_block.params, second_time_lucky)
    _, rows = _make_chunk([{"id": "d", "text": DOC, "domain": "prose"}], params.rollout_block.build(), gen,
                          NoCache(), params)
    assert len(gen.sent) == 2 + 3 + 1 and rows[0]["id"] == "d/0/entities~1/0"


def test_parse_entities_reads_the_json_object_and_nothing_else():
    from effitrain.generation.entigraph import parse_entities

    assert parse_entities('x {"summary": " S ", "entities": ["A", " a", "B", 3, ""]} y', 5) == ("S", ["A", "B"])
    assert parse_entities('{"entities": ["A", "B", "C"]}', 2) == (None, ["A", "B"])
    for bad in ("no braces", "{not json}", '{"entities": "A, B"}', '{"entities": []}', '["A", "B"]'):
        assert parse_entities(bad, 5) is None


def test_a_resumed_entigraph_chunk_rederives_its_second_round_from_the_cache(tmp_path):
    from effitrain.generation.cache import RequestCache
    from effitrain.generation.synthesis import _make_chunk

    params = _params({"name": "entigraph", "pairs": 2, "triples": 1})

    def reply(r, _):
        return [_entity_answer(ENTITIES)] if "### Entities:" not in r.prompt else [f"relation {r.key[:8]} text"]

    cache = RequestCache(tmp_path)
    first = Scripted(params.generator_block.params, reply)
    docs = [{"id": "d", "text": DOC, "domain": "prose"}]
    _, rows = _make_chunk(docs, params.rollout_block.build(), first, cache, params)
    second = Scripted(params.generator_block.params, reply)
    stats, again = _make_chunk(docs, params.rollout_block.build(), second, cache, params)
    assert not second.sent and stats["cached"] == len(first.sent) == 4 and again == rows
    cache.close()


# ----------------------------------------------------------------------------------------------------- ITERTL
def test_resample_keeps_the_continuations_nearest_the_reference():
    from effitrain.generation.cache import NoCache
    from effitrain.generation.resample import overlap_f1
    from effitrain.generation.synthesis import _make_chunk
    from effitrain.registry import ConfigError

    text = "one two three four five six seven eight nine ten"
    samples = ["six seven eight nine ten", "alpha beta", "six seven zebra", "nine ten six"]
    params = _params({"name": "resample", "prompt_words": 5, "keep": 2, "min_score": 0.1}, n=4)
    gen = Scripted(params.generator_block.params, lambda r, _: samples)
    _, rows = _make_chunk([{"id": "d", "text": text, "domain": "prose"}], params.rollout_block.build(), gen,
                          NoCache(), params)
    assert gen.sent[0].prompt == "one two three four five"  # the reference's start
    scores = [overlap_f1(s, "six seven eight nine ten") for s in samples]
    assert scores[0] == 1.0 and scores[1] == 0.0
    best = sorted(range(4), key=lambda j: -scores[j])[:2]
    assert sorted(r["sample"] for r in rows) == sorted(best) == [0, 3]
    assert rows[0]["text"] == "one two three four five six seven eight nine ten"  # start + continuation
    strict = _params({"name": "resample", "prompt_words": 5, "keep": 4, "min_score": 0.5}, n=4)
    _, kept = _make_chunk([{"id": "d", "text": text, "domain": "prose"}], strict.rollout_block.build(),
                          Scripted(strict.generator_block.params, lambda r, _: samples), NoCache(), strict)
    assert [r["sample"] for r in kept] == [j for j in range(4) if scores[j] >= 0.5]
    with pytest.raises(ConfigError, match=r"rollout.keep: keeps 3 of the generator's n=2"):
        _params({"name": "resample", "keep": 3}, n=2)


def test_each_round_mixes_references_and_samples_at_the_recipes_ratio():
    import numpy as np

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.curriculum.mixture import MixtureSampler

    for ratio, overrides in ((0.5, []), (0.2, ["stages.2.timeline.mixture.points.0.value={prose: 0.8, "
                                              "prose_resampled: 0.2}"])):
        composed = compose_config(["+recipe=iterative_resampling", *TINY, *overrides])
        spec = validate(composed.cfg, composed.recipes)
        round1 = spec.stage_specs[2]
        assert round1.block("dataset").params.synthetic == ["<dataset of stage sample1>"]
        assert spec.stage_specs[1].synthesis.generator_block.params.model == "<final model of stage round0>"
        assert spec.stage_specs[3].synthesis.generator_block.params.model == "<final model of stage round1>"
        timeline = round1.timeline.resolve(max_steps=400, tokens_per_step=1)
        labels = np.array(["prose"] * 50 + ["prose_resampled"] * 30)
        sampler = MixtureSampler(labels, timeline, seed=0, micro_batch_size=8, grad_accum=1, world_size=1, rank=0)
        drawn = np.concatenate([sampler.slot_domains(s) for s in range(400)])
        share = float((drawn == sampler.names.index("prose_resampled")).mean())
        assert abs(share - ratio) < 0.03, share


@pytest.mark.slow  # trains the recipe's three rounds (3 steps each)
def test_round_k_trains_on_samples_of_round_k_minus_1s_model(tmp_path, monkeypatch, train_in_process):
    """The recipe end to end (tiny sizes): each sampling stage's rows are what the previous round's final model
    draws for those requests -- regenerated here from that model, and not from the other round's."""
    from effitrain.config.blocks.synthesis import parse_synthesis
    from effitrain.generation.cache import NoCache
    from effitrain.generation.synthesis import _input_documents, _make_chunk

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    small = [f"stages.{i}.synthesis.{k}" for i in (1, 3) for k in
             ("max_documents=4", "chunk_documents=4", "generator.max_new_tokens=8", "generator.n=2")]
    summary = train_in_process(["+recipe=iterative_resampling", "dataset.domains=[prose]", "train.max_steps=3",
                                *small], tmp_path / "run")
    assert summary["finished"]
    stages = {row["stage"]: row for row in summary["stages"]}
    models = {name: stages[name]["final_model"] for name in ("round0", "round1", "round2")}
    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate

    composed = compose_config(["+recipe=iterative_resampling", *TINY, "dataset.domains=[prose]", *small])
    spec = validate(compose_config([*TINY, "dataset.domains=[prose]"]).cfg)  # the sampling stages' input
    for index, sample, source, other in ((1, "sample1", "round0", "round1"), (3, "sample2", "round1", "round0")):
        stage_dir = Path(stages[sample]["run_dir"])
        record = json.loads((stage_dir / "dataset.json").read_text())
        assert record["model"] == models[source] and record["rows"] > 0
        written = [json.loads(line) for line in (stage_dir / "chunks" / "000000.jsonl").read_bytes().splitlines()]

        def rows_from(model: str) -> list:
            raw = json.loads(json.dumps(composed.cfg["stages"][index]["synthesis"]))
            raw["generator"]["model"] = model
            params = parse_synthesis(raw, "s")
            gen = params.generator_block.build(model_path=model)
            return _make_chunk(_input_documents(spec, params), params.rollout_block.build(), gen, NoCache(),
                               params)[1]

        assert rows_from(models[source]) == written
        assert rows_from(models[other]) != written  # the check tells the rounds' models apart
    # each training round after the first trained on references and samples
    for name in ("round1", "round2"):
        config = (Path(stages[name]["run_dir"]) / "config.yaml").read_text()
        assert "prose_resampled" in config and "synthetic" in config


# ------------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_during_a_synthesis_stage_exits_75_and_resume_finishes_it_asking_nothing_twice(tmp_path):
    from generation_server import TinyServer
    from test_generation import _cache_rows_in

    folder = _tiny_model(tmp_path)
    server = TinyServer(str(folder)).start()
    try:
        def stage(run_dir: Path, env: dict) -> subprocess.Popen:
            synthesis = ("{rollout: {name: wrap, styles: [medium, qa], max_words: 40, min_words: 0}, generator: "
                         f"{{backend: openai, model: tiny, base_url: '{server.base_url}', max_new_tokens: 6, "
                         "concurrency: 2, retries: 2, backoff_seconds: 0.01}, max_documents: 6, chunk_documents: 2, "
                         "domain_suffix: wrap}")
            return subprocess.Popen([sys.executable, "-m", "effitrain.cli", *TINY, "dataset.domains=[prose]",
                                     f"+stages=[{{name: synth, synthesis: {synthesis}}}]", f"run_dir={run_dir}",
                                     *(["resume=auto"] if run_dir.exists() else [])],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        env_ref = {**os.environ, "EFFITRAIN_CACHE": str(tmp_path / "cache_ref")}
        ref = stage(tmp_path / "reference", env_ref)
        out, err = ref.communicate(timeout=300)
        assert ref.returncode == 0, err[-2000:]
        uninterrupted = len(server.answered)
        server.reset_counts()

        env = {**os.environ, "EFFITRAIN_CACHE": str(tmp_path / "cache")}
        server.hold_after = 5  # mid-chunk: a chunk of 2 documents asks at least 4 requests
        stopped = stage(tmp_path / "run", env)
        assert server.holding.wait(timeout=300), stopped.stderr.read()[-2000:]
        stopped.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.release()  # the held request is dropped; the stage's retry of it is answered, then it stops
        out, err = stopped.communicate(timeout=120)
        assert stopped.returncode == 75, err[-2000:]
        assert "SIGTERM" in err and "resume=auto" in out + err
        stage_dir = tmp_path / "run" / "stages" / "01-synth"
        assert not (stage_dir / "dataset.jsonl").exists()
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["exit_code"] == 75 and summary["stopped_by_signal"] == "SIGTERM"
        answered_before = len(server.answered)
        assert answered_before >= 5 and _cache_rows_in(env) == answered_before  # every answer received is cached

        resumed = stage(tmp_path / "run", env)
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-2000:]
        assert (stage_dir / "dataset.jsonl").read_bytes() == \
            (tmp_path / "reference" / "stages" / "01-synth" / "dataset.jsonl").read_bytes()
        assert len(server.answered) == uninterrupted and len(set(server.answered)) == uninterrupted  # none twice
    finally:
        server.stop()


def _tiny_model(tmp_path: Path) -> Path:
    """The tiny generator of tests/test_generation.py (its fixture's body), made here for a test of this file."""
    import datasets
    import torch
    import transformers

    from effitrain.data.demo import load_demo
    from effitrain.data.tokenizer import train_bpe

    folder = tmp_path / "tiny_generator"
    texts = load_demo(60, 4, 0, domains=["prose"])["train"]["text"]
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 400, folder)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_plan_shows_entigraphs_first_round_and_its_bound_on_follow_ups():
    from effitrain.config.compose import compose_config
    from effitrain.plan import format_section, plan_sections

    composed = compose_config(["+recipe=entigraph", *TINY])
    section = plan_sections(composed.cfg, composed.recipes)[1]
    c = section.counts
    # one entity request per piece; at most 1 retry + 3 pairs + 1 triple follow it (max_entities 8)
    assert c["requests"] == c["pieces"] and c["follow_ups"] == 5 * c["pieces"] and c["documents"] == 24
    assert c["max_tokens_out"] == 6 * c["pieces"] * 96
    assert f"+ at most {c['follow_ups']:,} follow-ups" in format_section(section)
