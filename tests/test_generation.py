"""Generation as a block: the generator backends, the WRAP rollout, the synthesis stage (chunks, request cache,
resume after SIGKILL, failing and malformed servers) and the checks of `effitrain check`.

The ``openai`` backend is tested against a real OpenAI-compatible HTTP server on localhost
(tests/generation_server.py: the standard library's http.server around a tiny model), which counts the answers it
sends; the ``vllm`` backend where a GPU and vllm are present.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, effitrain_cli
from generation_server import TinyServer

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="module")
def _blocks():
    from effitrain.config.blocks import load_builtin_blocks

    load_builtin_blocks()
INPUT = [*TINY, "dataset.domains=[prose]"]  # the stage maps the demo corpus's prose


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with its BPE tokenizer and a generation_config.json that asks for a repetition penalty and
    top-k 5 -- which no backend may apply, since the block names every sampling parameter."""
    import datasets
    import torch
    import transformers

    from effitrain.data.demo import load_demo
    from effitrain.data.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("tiny_generator")
    texts = load_demo(60, 4, 0, domains=["prose"])["train"]["text"]
    train_bpe(datasets.Dataset.from_dict({"text": texts}), 400, folder)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(repetition_penalty=3.0, top_k=5, do_sample=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def server(model_dir):
    s = TinyServer(str(model_dir)).start()
    yield s
    s.stop()


def _synthesis(base_url: str, **changes) -> dict:
    gen = {"backend": "openai", "model": "tiny", "base_url": base_url, "max_new_tokens": 6, "temperature": 1.0,
           "concurrency": 2, "retries": 2, "backoff_seconds": 0.01, "timeout_seconds": 30}
    gen.update(changes.pop("generator", {}))
    return {"rollout": {"name": "wrap", "styles": ["medium", "qa"], "max_words": 40, "min_words": 0},
            "generator": gen, "max_documents": 6, "chunk_documents": 2, "domain_suffix": "wrap", **changes}


def _run(synthesis: dict, stage_dir: Path):
    from synthesis_job import run

    return run({"stage_dir": str(stage_dir), "synthesis": synthesis, "overrides": INPUT})


# ------------------------------------------------------------------------------------------------------ mechanism
def test_each_style_prompt_is_the_papers_instruction_around_the_piece():
    from effitrain.generation.rollouts import WRAP_INSTRUCTIONS, build_wrap
    from effitrain.registry import REGISTRY

    rollout = REGISTRY.parse("rollout", {"name": "wrap", "styles": ["easy", "medium", "hard", "qa"]}).build()
    prompts = dict(rollout.prompts("The cat sat on the mat."))
    assert set(prompts) == {"easy", "medium", "hard", "qa"}
    assert "toddler" in prompts["easy"] and "Wikipedia" in prompts["medium"] and "erudite scholar" in prompts["hard"]
    assert '"Question:" followed by "Answer:"' in prompts["qa"]
    for style, prompt in prompts.items():  # the Vicuna layout: preamble, USER: instruction, the text, ASSISTANT:
        assert prompt.startswith("A chat between a curious user") and prompt.endswith("The cat sat on the mat.\n"
                                                                                     "ASSISTANT:")
        assert f"USER: {WRAP_INSTRUCTIONS[style]}\n" in prompt
    assert build_wrap  # registered by name: the stage looks it up, never imports it


def test_pieces_end_at_sentences_and_hold_at_most_max_words():
    from effitrain.generation.rollouts import split_pieces

    text = "One two three. Four five six seven. Eight nine. " + " ".join(f"w{i}" for i in range(12)) + ". End."
    pieces = split_pieces(text, 6)
    assert all(len(p.split()) <= 6 for p in pieces)
    # sentences join while they fit; a sentence longer than a piece is cut at max_words
    assert pieces == ["One two three.", "Four five six seven. Eight nine.", "w0 w1 w2 w3 w4 w5",
                      "w6 w7 w8 w9 w10 w11.", "End."]
    assert " ".join(pieces).split() == text.split()  # nothing lost, nothing repeated


def test_fan_out_parse_and_post_filter_make_the_rows():
    from effitrain.generation.backends import Answer, Generator
    from effitrain.generation.cache import NoCache
    from effitrain.generation.synthesis import _make_chunk
    from effitrain.registry import parse_params
    from effitrain.config.blocks.synthesis import SynthesisParams

    class Echo(Generator):  # answers with a preamble and the prompt's style; "qa" answers are one word only
        backend = "echo"

        def answer(self, requests, should_stop=lambda: False):
            for r in requests:
                short = "Question:" in r.prompt
                texts = tuple("Sure! Here is a paraphrase of the paragraph:\nshort" if short else
                              f"a rephrase number {k} of it" for k in range(self.params.n))
                yield [(r, Answer(texts, 3))]

    params = parse_params(SynthesisParams, {"rollout": {"name": "wrap", "styles": ["medium", "qa"], "max_words": 8,
                                                        "min_words": 2},
                                            "generator": {"model": "x", "n": 2}, "domain_suffix": "wrap"}, "s")
    rollout = params.rollout_block.build()
    gen = Echo(params.generator_block.params, "fp")
    docs = [{"id": "d0", "text": "a b c d e. f g h i j k.", "domain": "prose"}, {"id": "d1", "text": "x y.", "domain": "code"}]
    stats, rows = _make_chunk(docs, rollout, gen, NoCache(), params)
    # 3 pieces (d0: 2, d1: 1) x 2 styles = 6 requests; x n=2 = 12 samples; the qa answers parse to one word: dropped
    assert stats["pieces"] == 3 and stats["sent"] == 6 and stats["dropped"] == 6 and len(rows) == 6
    assert {r["variant"] for r in rows} == {"medium"} and {r["sample"] for r in rows} == {0, 1}
    assert [r["domain"] for r in rows] == ["prose_wrap"] * 4 + ["code_wrap"] * 2
    assert rows[0]["text"] == "a rephrase number 0 of it" and rows[0]["source_id"] == "d0"
    assert rollout.parse("Sure! Here is a paraphrase of the text:\nThe text.") == "The text."  # the preamble goes


def test_the_recipe_trains_on_real_and_rephrased_one_to_one(tmp_path):
    import datasets

    from effitrain.config.compose import compose_config
    from effitrain.config.spec import validate
    from effitrain.data.synthetic import with_synthetic
    from effitrain.plan import format_section, plan_sections

    composed = compose_config(["+recipe=wrap_rephrase", *INPUT])
    spec = validate(composed.cfg, composed.recipes)
    rephrase, pretrain = spec.stage_specs[1], spec.stage_specs[2]
    assert rephrase.synthesis.generator_block.name == "transformers"
    assert pretrain.block("curriculum").name == "mixture"
    weights = pretrain.timeline.resolve(max_steps=10, tokens_per_step=1).value("mixture", 0)
    assert weights == {"prose": 0.5, "prose_wrap": 0.5}
    assert pretrain.block("dataset").params.synthetic == ["<dataset of stage rephrase>"]
    # the synthetic rows join the train split (not the eval split) with their own domain
    made = tmp_path / "dataset.jsonl"
    made.write_text("".join(json.dumps({"id": f"r{i}", "text": f"rephrased {i}", "domain": "prose_wrap"}) + "\n"
                            for i in range(3)))
    train = datasets.Dataset.from_dict({"id": ["a", "b"], "text": ["real a", "real b"], "domain": ["prose"] * 2})
    joined = with_synthetic(train, pretrain.block("dataset").params.__class__(synthetic=[str(made)]))
    assert joined["domain"] == ["prose", "prose", "prose_wrap", "prose_wrap", "prose_wrap"]
    sections = plan_sections(composed.cfg, composed.recipes)
    text = format_section(sections[1])
    assert "synthesis: rollout wrap" in text and "documents in" in text and "tokens out     at most" in text
    counts = sections[1].counts
    assert counts["requests"] == counts["pieces"] >= counts["documents"] == 48  # one style (qa) per piece
    assert counts["max_tokens_out"] == counts["requests"] * 128


def test_stage_references_name_the_right_kind_of_stage():
    from effitrain.config.stages import parse_stages
    from effitrain.registry import ConfigError

    synth = {"name": "make", "synthesis": {"rollout": {"name": "wrap"}, "generator": {"model": "@stage:base"}}}
    with pytest.raises(ConfigError, match="names a synthesis stage, which leaves a dataset, not a model"):
        parse_stages([{"name": "base"}, synth, {"name": "t", "init": "@stage:make"}])
    with pytest.raises(ConfigError, match="must name an earlier synthesis stage"):
        parse_stages([{"name": "base"}, synth, {"name": "t", "init": "scratch", "dataset": "@stage:base"}])
    with pytest.raises(ConfigError, match="leaves a dataset, not a model; set init: scratch"):
        parse_stages([{"name": "base"}, synth, {"name": "t"}])
    stages = parse_stages([{"name": "base"}, synth, {"name": "t", "init": "scratch", "dataset": "@stage:make"}])
    assert stages[1].init == "scratch" and not stages[1].leaves_model
    # dataset: "@stage:NAME" trains on that stage's file alone, packed as the recipe's own dataset block says
    from effitrain.config.stages import stage_config

    base = {"dataset": {"name": "demo", "seq_len": 64, "max_docs_per_domain": 10}, "stages": []}
    run = stage_config(base, stages[2], init_model=None, final_models={"make": "/runs/x/stages/02-make/dataset.jsonl"})
    assert run["dataset"] == {"name": "local", "path": "/runs/x/stages/02-make/dataset.jsonl", "domain_field": "domain",
                              "text_field": "text", "seq_len": 64}


# ---------------------------------------------------------------------------------------------------- backends
def test_transformers_backend_samples_only_what_the_block_says_and_repeats_a_batch(model_dir):
    from effitrain.config.blocks.generator import parse_generator

    block = parse_generator({"model": str(model_dir), "max_new_tokens": 5, "n": 2, "batch_size": 3, "seed": 7},
                            "generator")
    gen = block.build(model_path=str(model_dir))
    requests = [gen.request(p) for p in ("The first prompt", "A second, longer prompt here", "Third")]
    first = [a for group in gen.answer(requests) for _, a in group]
    again = [a for group in gen.answer(requests) for _, a in group]
    assert first == again and all(len(a.texts) == 2 for a in first)  # n samples; the same batch, the same draws
    assert all(0 < a.tokens <= 10 for a in first)
    assert gen.model.generation_config.repetition_penalty == 3.0  # the checkpoint's own config is back after
    other = parse_generator({"model": str(model_dir), "max_new_tokens": 5, "n": 2, "seed": 8}, "generator")
    assert other.build(model_path=str(model_dir)).request("Third").key != requests[2].key  # the seed is in the key


def test_vllm_backend_on_a_gpu(model_dir):
    from effitrain.config.blocks.generator import _gpu_count
    from effitrain.config.inputs import package_available

    if not package_available("vllm"):
        pytest.skip("vllm is not installed here (pip install vllm on a GPU machine)")
    if not _gpu_count():
        pytest.skip("no GPU on this machine: the vllm backend runs on one")
    from effitrain.config.blocks.generator import parse_generator

    block = parse_generator({"backend": "vllm", "model": str(model_dir), "max_new_tokens": 5, "n": 2,
                             "gpu_memory_utilization": 0.3}, "generator")
    block.params.check_inputs("generator")
    gen = block.build(model_path=str(model_dir))
    requests = [gen.request(p) for p in ("The first prompt", "Third")]
    first = [a for group in gen.answer(requests) for _, a in group]
    again = [a for group in gen.answer(requests) for _, a in group]
    assert first == again and all(len(a.texts) == 2 for a in first)  # one seed per request: the same draws


# ---------------------------------------------------------------------------------------- the stage, openai
def test_openai_backend_against_a_server_and_a_second_run_sends_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    summary = _run(_synthesis(server.base_url), tmp_path / "one")
    record = summary["synthesis"]
    sent = len(server.answered)
    assert sent == record["requests_sent"] == record["pieces"] * 2 and record["requests_cached"] == 0
    rows = [json.loads(line) for line in (tmp_path / "one" / "dataset.jsonl").read_bytes().splitlines()]
    # a row per answer the rollout keeps: the tiny model's sample may be empty (then the piece has no row for it),
    # and whether one is depends on the CPU's float reductions, not on the plumbing under test
    from effitrain.generation.rollouts import WrapRollout

    rollout = WrapRollout(styles=["medium", "qa"], max_words=40, min_words=0)
    kept = [t for t in server.texts if rollout.parse(t) is not None]
    assert 0 < len(rows) == len(kept) and {r["domain"] for r in rows} == {"prose_wrap"}
    assert len({p for p, _ in server.answered}) == sent  # every prompt once
    second = _run(_synthesis(server.base_url), tmp_path / "two")
    assert len(server.answered) == sent and second["synthesis"]["requests_cached"] == sent  # nothing sent
    assert (tmp_path / "two" / "dataset.jsonl").read_bytes() == (tmp_path / "one" / "dataset.jsonl").read_bytes()


def test_the_chat_api_sends_the_prompt_as_a_user_message_and_caches_apart(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    chat = _run(_synthesis(server.base_url, generator={"api": "chat"}), tmp_path / "chat")["synthesis"]
    assert server.chat_requests == len(server.answered) == chat["requests_sent"] > 0
    # the server's template wrapped the prompt: the answers came from "user: <prompt>\nassistant:"
    assert all(p.startswith("user: A chat between") and p.endswith("\nassistant:") for p, _ in server.answered)
    plain = _run(_synthesis(server.base_url), tmp_path / "plain")["synthesis"]
    # the same prompts through /completions are other requests: none of the chat answers is reused
    assert plain["requests_cached"] == 0 and plain["requests_sent"] == chat["requests_sent"]
    assert server.chat_requests == chat["requests_sent"]


def test_sigkill_mid_stage_then_resume_gives_the_same_bytes_and_no_request_twice(server, tmp_path):
    reference_env = {**os.environ, "EFFITRAIN_CACHE": str(tmp_path / "cache_ref")}
    env = {**os.environ, "EFFITRAIN_CACHE": str(tmp_path / "cache")}

    def job(stage_dir: Path, env: dict) -> subprocess.Popen:
        spec = tmp_path / f"{stage_dir.name}.json"
        spec.write_text(json.dumps({"stage_dir": str(stage_dir), "synthesis": _synthesis(server.base_url),
                                    "overrides": INPUT}))
        return subprocess.Popen([sys.executable, str(HERE / "synthesis_job.py"), str(spec)], env=env, cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref = job(tmp_path / "reference", reference_env)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    uninterrupted = len(server.answered)
    server.reset_counts()

    server.hold_after = 5  # mid-chunk: chunks of 2 documents make at least 4 requests each
    killed = job(tmp_path / "stage", env)
    assert server.holding.wait(timeout=300), killed.stderr.read()[-2000:]
    deadline = time.monotonic() + 30
    while _cache_rows_in(env) < 5 and time.monotonic() < deadline:  # the answers it got are committed
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (tmp_path / "stage" / "dataset.jsonl").exists() and len(server.answered) == 5
    server.release()

    resumed = job(tmp_path / "stage", env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert (tmp_path / "stage" / "dataset.jsonl").read_bytes() == \
        (tmp_path / "reference" / "dataset.jsonl").read_bytes()
    assert len(server.answered) == uninterrupted and len(set(server.answered)) == uninterrupted  # none twice


def _cache_rows_in(env: dict) -> int:
    path = Path(env["EFFITRAIN_CACHE"]) / "generation" / "requests.sqlite"
    if not path.is_file():
        return 0
    with sqlite3.connect(str(path)) as db:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_a_server_that_fails_mid_stage_is_retried_then_stops_keeping_what_was_written(server, tmp_path,
                                                                                     monkeypatch, capsys):
    from effitrain.errors import RunFailed

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    synthesis = _synthesis(server.base_url)
    synthesis["rollout"]["max_words"] = 400  # a piece per document: 4 requests per chunk of 2 documents
    server.fail_after = 9  # two chunks and one answer of the third
    with pytest.raises(RunFailed, match=r"failed 3 time\(s\), the last: HTTP 500") as info:
        _run(synthesis, tmp_path / "stage")
    assert "\n" not in str(info.value)
    assert server.received > 9 and len(server.answered) == 9
    assert "retry 1/2" in capsys.readouterr().err
    chunk = tmp_path / "stage" / "chunks" / "000000.jsonl"
    assert chunk.is_file() and not (tmp_path / "stage" / "dataset.jsonl").exists()
    before = chunk.stat().st_mtime_ns
    server.fail_after = None
    summary = _run(synthesis, tmp_path / "stage")
    assert summary["finished"] and chunk.stat().st_mtime_ns == before  # the finished chunk is kept as it was
    record = summary["synthesis"]
    # the answer the failed chunk had got came from the cache; every request was answered once in all
    assert record["requests_cached"] >= 1
    assert record["requests_sent"] + record["requests_cached"] == len(server.answered) == len(set(server.answered))


def test_malformed_answers_are_retried_then_one_clear_error(server, tmp_path, monkeypatch):
    from effitrain.errors import RunFailed

    monkeypatch.setenv("EFFITRAIN_CACHE", str(tmp_path / "cache"))
    server.malformed_after = 0
    with pytest.raises(RunFailed, match=r"answered without 1 choice\(s\)"):
        _run(_synthesis(server.base_url), tmp_path / "stage")
    assert server.received >= 3 and not server.answered  # the first try and two retries, at least


# ------------------------------------------------------------------------------------------------------ check
def test_check_refuses_a_generator_it_cannot_use_in_one_line(tmp_path, model_dir):
    g = "stages.1.synthesis.generator"
    base = ["check", "+recipe=wrap_rephrase", f"run_dir={tmp_path / 'run'}"]
    openai = [f"{g}.backend=openai", f"{g}.model=tiny", f"+{g}.probe_seconds=2"]
    cases = {
        "the endpoint does not answer": [*openai, f"+{g}.base_url=http://127.0.0.1:9/v1"],
        "does not exist": [f"{g}.model={tmp_path / 'no_such_model'}"],
        "NO_SUCH_KEY_H25 is not set": [*openai, f"+{g}.base_url=http://127.0.0.1:9/v1",
                                        f"+{g}.api_key_env=NO_SUCH_KEY_H25"],
    }
    for words, overrides in cases.items():
        result = effitrain_cli(*base, *overrides)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("effitrain: error: stages.rephrase: synthesis.generator.") and \
            words in result.stderr, result.stderr
    ok = effitrain_cli(*base, f"{g}.model={model_dir}")
    assert ok.returncode == 0, ok.stderr
