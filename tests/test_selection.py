"""Data selection mechanics on small fixtures where the right answer is known."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from effitrain.registry import REGISTRY, ConfigError, load_builtin_blocks  # noqa: E402

load_builtin_blocks()

# ------------------------------------------------------------------------------------------------ fixtures

_NOUNS = ["river", "garden", "village", "teacher", "morning", "window", "harbor", "forest", "market", "letter",
          "mountain", "kitchen", "painter", "evening", "library", "meadow", "stranger", "journey", "candle", "bridge"]
_VERBS = ["walked", "watched", "carried", "remembered", "followed", "painted", "opened", "crossed", "found", "left"]
_ADJ = ["quiet", "old", "bright", "narrow", "distant", "gentle", "cold", "golden", "small", "empty"]
_IDENT = ["value", "items", "result", "count", "index", "buffer", "node", "key", "total", "offset"]


def prose_doc(rng: random.Random, sentences: int = 5) -> str:
    out = []
    for _ in range(sentences):
        out.append(f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJ)} "
                   f"{rng.choice(_NOUNS)} near the {rng.choice(_NOUNS)}.")
    return " ".join(out)


def code_doc(rng: random.Random, lines: int = 5) -> str:
    a, b, c = rng.sample(_IDENT, 3)
    body = [f"def update_{a}({b}, {c}):"]
    for _ in range(lines):
        x, y = rng.sample(_IDENT, 2)
        body.append(f"    {x} = {y}[{rng.randint(0, 9)}] + {c}.get({x!r}, {rng.randint(0, 99)})")
    body.append(f"    return {b}")
    return "\n".join(body)


def arith_doc(rng: random.Random, lines: int = 6) -> str:
    rows = []
    for _ in range(lines):
        x, y = rng.randint(10, 99), rng.randint(10, 99)
        rows.append(f"{x} + {y} = {x + y}")
    return "\n".join(rows)


def make_pool(n_per_domain: int = 40, seed: int = 0) -> "datasets.DatasetDict":
    rng = random.Random(seed)
    rows = {"id": [], "text": [], "domain": []}
    ev = {"id": [], "text": [], "domain": []}
    for dom, fn in (("prose", prose_doc), ("code", code_doc), ("arithmetic", arith_doc)):
        for i in range(n_per_domain):
            rows["id"].append(f"{dom}-{i}")
            rows["text"].append(fn(rng))
            rows["domain"].append(dom)
        for i in range(4):
            ev["id"].append(f"eval-{dom}-{i}")
            ev["text"].append(fn(rng))
            ev["domain"].append(dom)
    return datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), eval=datasets.Dataset.from_dict(ev))


@pytest.fixture(scope="module")
def pool():
    return make_pool()


def make_reference_model(folder: Path, texts: list[str]) -> Path:
    """A tiny Llama with a byte-level BPE trained on ``texts``, saved with save_pretrained (no download)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory, pool):
    return make_reference_model(tmp_path_factory.mktemp("refmodel"), list(pool["train"]["text"]))


def parse(block: dict):
    return REGISTRY.parse("selection", block, "selection")


def build(block: dict, pool, cache: Path, seed: int = 0):
    return parse(block).build(pool, cache_dir=str(cache), seed=seed)


def score(block: dict, pool, seed: int = 0):
    """Run only the scorer of a selection block; returns (Scores, candidate domains)."""
    from effitrain.selection.base import Context, add_token_counts
    from effitrain.selection.target import resolve_target

    params = parse(block).params
    target, cand = resolve_target(params.target, pool, seed)
    cand = cand.map(add_token_counts, batched=True)
    scorer = params.scorer_block.build()
    result = scorer.score(cand, Context(target=target, seed=seed, batch_size=16))
    return result, np.asarray(cand["domain"])


TARGET_CODE = {"domain": "code", "max_examples": 12}


def assert_target_outranks(scores: np.ndarray, domains: np.ndarray) -> None:
    code, prose = scores[domains == "code"], scores[domains == "prose"]
    assert np.median(code) > np.median(prose), (np.median(code), np.median(prose))
    # the single best-scored example is target-like
    assert domains[int(np.argmax(scores))] == "code"


# ------------------------------------------------------------------------------------------------ scorers

@pytest.mark.parametrize("name", ["dsir", "zip_fit", "quality_classifier"])
def test_target_like_outranks_unrelated(pool, name):
    result, domains = score({"name": name, "target": TARGET_CODE}, pool)
    assert result.scores.shape == (len(domains),)
    assert_target_outranks(result.scores, domains)


def test_less_target_like_outranks_unrelated(pool):
    block = {"name": "less", "target": TARGET_CODE,
             "scorer": {"proxy_steps": 15, "warmup_steps": 5, "warmup_fraction": 0.3, "max_length": 96,
                        "proj_dim": 64, "max_target": 8}}
    result, domains = score(block, pool)
    assert_target_outranks(result.scores, domains)


def test_dsir_selection_prefers_target_domain(pool, tmp_path):
    sel = build({"name": "dsir", "target": TARGET_CODE, "budget": {"fraction": 0.2}}, pool, tmp_path)
    kept = sel.info["kept_domains"]
    assert kept.get("code", 0) > kept.get("prose", 0) + kept.get("arithmetic", 0)
    assert 0.2 <= sel.info["kept_token_fraction"] < 0.3
    # the target examples were held out of the candidates and so cannot be selected
    from effitrain.selection.target import resolve_target
    target, cand = resolve_target(parse({"name": "dsir", "target": TARGET_CODE}).params.target, pool, 0)
    assert len(cand) == sel.info["pool_examples"] == len(pool["train"]) - TARGET_CODE["max_examples"]
    target_texts = set(target["text"])
    assert not target_texts & set(sel.train["text"])


def test_dedup_drops_exact_and_near_duplicates(tmp_path):
    rng = random.Random(1)
    base = [prose_doc(rng, sentences=8) for _ in range(6)]
    words = base[0].split()
    near = " ".join(words[:-1] + ["lighthouse."])            # one word changed at the end
    exact = "  " + base[1].upper().replace(" ", "   ") + " "  # same text up to case and whitespace
    texts = base + [near, exact]
    ids = [f"d{i}" for i in range(len(texts))]
    pool = datasets.DatasetDict(train=datasets.Dataset.from_dict({"id": ids, "text": texts,
                                                                  "domain": ["prose"] * len(texts)}),
                                eval=datasets.Dataset.from_dict({"id": ["e"], "text": ["x"], "domain": ["prose"]}))
    sel = build({"name": "dedup", "budget": {"fraction": 1.0}, "scorer": {"shingle_size": 3}}, pool, tmp_path)
    assert sorted(sel.train["id"]) == sorted(ids[:6])
    assert sel.info["scorer_exact_duplicates"] == 1 and sel.info["scorer_near_duplicates"] == 1


def test_perplexity_keeps_a_band(pool, reference_model, tmp_path):
    block = {"name": "perplexity", "scorer": {"model_path": str(reference_model), "max_length": 64},
             "selector": {"low": 0.2, "high": 0.8}, "budget": {"fraction": 1.0, "unit": "examples"}}
    sel = build(block, pool, tmp_path)
    lines = [json.loads(x) for x in open(Path(sel.manifest_path).parent / "selected.jsonl")]
    result, _ = score(block, pool)
    lo, hi = np.quantile(result.scores, [0.2, 0.8])
    assert all(lo - 1e-6 <= r["score"] <= hi + 1e-6 for r in lines)
    assert 0.55 * len(pool["train"]) <= len(lines) <= 0.65 * len(pool["train"])


def _cluster_counts(sel) -> dict[int, int]:
    lines = [json.loads(x) for x in open(Path(sel.manifest_path).parent / "selected.jsonl")]
    counts: dict[int, int] = {}
    for r in lines:
        counts[r["cluster"]] = counts.get(r["cluster"], 0) + 1
    return counts


def test_diversity_kmeans_is_cluster_balanced(pool, reference_model, tmp_path):
    block = {"name": "diversity_kmeans", "budget": {"fraction": 0.25, "unit": "examples"},
             "scorer": {"model_path": str(reference_model), "num_clusters": 3, "max_length": 64}}
    sel = build(block, pool, tmp_path)
    counts = _cluster_counts(sel)
    assert len(counts) == 3 and sum(counts.values()) == 30
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_s2l_is_cluster_balanced(pool, tmp_path):
    block = {"name": "s2l", "budget": {"fraction": 0.25, "unit": "examples"},
             "scorer": {"proxy_steps": 12, "checkpoints": 3, "num_clusters": 3, "max_length": 64,
                        "batch_size": 64}}
    sel = build(block, pool, tmp_path)
    counts = _cluster_counts(sel)
    assert sum(counts.values()) == 30
    # every cluster at least as large as its share gives exactly its share (ties within one example)
    result, _ = score(block, pool)
    sizes = np.bincount(result.clusters)
    assert len(counts) == len(sizes)
    full = [c for c, n in counts.items() if sizes[c] > n]
    assert max(counts[c] for c in full) - min(counts[c] for c in full) <= 1, (counts, sizes)


# ------------------------------------------------------------------------------------------------ selectors

def test_cluster_balanced_selector_passes_leftover_on():
    from effitrain.selection.selectors import ClusterBalancedSelector

    clusters = np.array([0] * 2 + [1] * 10 + [2] * 20)
    sel = ClusterBalancedSelector(REGISTRY.parse("selector", {"name": "cluster_balanced"}, "s").params)
    idx = sel.select(np.zeros(32), clusters, np.ones(32), 12, np.random.default_rng(0))
    assert np.bincount(clusters[idx]).tolist() == [2, 5, 5]


def test_gumbel_topk_is_importance_resampling():
    from effitrain.selection.selectors import GumbelTopKSelector, take_until

    sel = GumbelTopKSelector(REGISTRY.parse("selector", {"name": "gumbel_topk"}, "s").params)
    scores = np.r_[np.full(5, 50.0), np.zeros(95)]      # weights e^50 vs 1: always the first five
    idx = sel.select(scores, None, np.ones(100), 5, np.random.default_rng(3))
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]
    # log weight log(3): chosen about 3x as often as weight 1 in a small sample without replacement
    scores = np.r_[np.full(50, np.log(3.0)), np.zeros(50)]
    hits = sum((sel.select(scores, None, np.ones(100), 4, np.random.default_rng(s)) < 50).sum() for s in range(300))
    assert 2.4 < hits / (1200 - hits) < 3.7
    # token budget: the prefix that first reaches the budget
    assert take_until(np.array([2, 0, 1]), np.array([5.0, 5.0, 5.0]), 7).tolist() == [2, 0]


# ------------------------------------------------------------------------------------------------ manifest cache

def test_manifest_reused_and_invalidated(pool, tmp_path):
    block = {"name": "zip_fit", "target": TARGET_CODE, "budget": {"fraction": 0.3}}
    first = build(block, pool, tmp_path)
    assert first.info["cache_hit"] is False and Path(first.manifest_path).is_file()
    header = json.loads(Path(first.manifest_path).read_text())
    assert header["method"] == "zip_fit" and header["params"]["scorer"]["name"] == "zip_fit"

    again = build(block, pool, tmp_path)
    assert again.info["cache_hit"] is True and again.manifest_path == first.manifest_path
    assert again.train["id"] == first.train["id"]

    # a changed pool text, a changed parameter, a changed target: each a new manifest
    train = pool["train"].to_dict()
    train["text"][-1] = train["text"][-1] + " changed"
    changed = datasets.DatasetDict(train=datasets.Dataset.from_dict(train), eval=pool["eval"])
    other_pool = build(block, changed, tmp_path)
    other_param = build({**block, "scorer": {"max_chars": 500}}, pool, tmp_path)
    other_target = build({**block, "target": {"domain": "code", "max_examples": 10}}, pool, tmp_path)
    paths = {first.manifest_path, other_pool.manifest_path, other_param.manifest_path, other_target.manifest_path}
    assert len(paths) == 4
    assert not any(s.info["cache_hit"] for s in (other_pool, other_param, other_target))
    # cache: false always scores again
    assert build({**block, "cache": False}, pool, tmp_path).info["cache_hit"] is False


def test_target_from_file(pool, tmp_path):
    rng = random.Random(5)
    path = tmp_path / "target.jsonl"
    path.write_text("".join(json.dumps({"content": code_doc(rng)}) + "\n" for _ in range(10)))
    block = {"name": "dsir", "target": {"path": [str(path)], "text_field": "content"}, "budget": {"fraction": 0.2}}
    sel = build(block, pool, tmp_path)
    assert sel.info["pool_examples"] == len(pool["train"])  # nothing held out: the target is outside the pool
    assert sel.info["target_examples"] == 10
    assert sel.info["kept_domains"].get("code", 0) > len(sel.train) / 2


def test_none_returns_the_pool(pool):
    sel = REGISTRY.parse("selection", {"name": "none"}, "selection").build(pool, cache_dir=None, seed=0)
    assert sel.train is pool["train"] and sel.manifest_path is None


def test_random_keeps_the_token_budget(pool, tmp_path):
    sel = build({"name": "random", "budget": {"fraction": 0.5}}, pool, tmp_path)
    assert 0.5 <= sel.info["kept_token_fraction"] < 0.56
    assert sel.info["examples_per_s"] > 0 and sel.info["seconds"] >= 0


# ------------------------------------------------------------------------------------------------ config errors

@pytest.mark.parametrize("block, message", [
    ({"name": "dsir"}, "selection.target: scorer 'dsir' needs target data"),
    ({"name": "dsir", "target": {"domain": "code"}, "scorer": {"num_bucket": 10}},
     "selection.scorer.num_bucket: unknown key (did you mean 'num_buckets'?)"),
    ({"name": "dsir", "target": {"domain": "code"}, "scorer": {"name": "zip_fit"}},
     "selection.scorer.name: preset uses scorer 'dsir'"),
    ({"name": "scored", "scorer": {"name": "dsir"}}, "selection.selector.name: required key is missing"),
    ({"name": "dsir", "target": {"domain": "code"}, "selector": {"name": "cluster_balanced"}},
     "selection.selector.name: 'cluster_balanced' needs a scorer that emits clusters"),
    ({"name": "perplexity"}, "selection.scorer.model_path: the perplexity scorer needs a reference model"),
    ({"name": "random", "budget": {"fraction": 0}}, "selection.budget.fraction: 0.0 is out of range"),
    ({"name": "perplexity", "scorer": {"model_path": "m"}, "selector": {"low": 0.9, "high": 0.1}},
     "selection.selector.low: 0.9 must be below"),
    ({"name": "dsir", "target": {"domain": "code", "path": ["x.jsonl"]}}, "selection.target: set exactly one of"),
    ({"name": "dsr"}, "selection.name: unknown selection 'dsr' (did you mean 'dsir'?)"),
    ({"name": "dsir", "target": {"domian": "code"}}, "selection.target.domian: unknown key (did you mean 'domain'?)"),
])
def test_config_errors_name_the_key(block, message):
    with pytest.raises(ConfigError) as exc:
        parse(block)
    assert message in str(exc.value)


def test_unknown_target_domain_is_a_config_error(pool, tmp_path):
    with pytest.raises(ConfigError, match=r"selection.target.domain: no 'cod' examples.*did you mean 'code'"):
        build({"name": "dsir", "target": {"domain": "cod"}}, pool, tmp_path)


def test_changed_reference_model_invalidates_the_manifest(pool, reference_model, tmp_path):
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(reference_model, model)
    block = {"name": "perplexity", "scorer": {"model_path": str(model), "max_length": 32}}
    first = build(block, pool, tmp_path / "cache")
    assert build(block, pool, tmp_path / "cache").info["cache_hit"] is True
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    again = build(block, pool, tmp_path / "cache")
    assert again.info["cache_hit"] is False and again.manifest_path != first.manifest_path
