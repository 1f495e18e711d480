"""Data selection mechanics on small fixtures where the right answer is known."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from effitrain.config.blocks import load_builtin_blocks  # noqa: E402
from effitrain.registry import REGISTRY, ConfigError  # noqa: E402

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
    # DSIR's 100-token minimum would drop every fixture document (20-60 tokens)
    scorer = {"min_length": 0} if name == "dsir" else {}
    result, domains = score({"name": name, "target": TARGET_CODE, "scorer": scorer}, pool)
    assert result.scores.shape == (len(domains),)
    assert_target_outranks(result.scores, domains)


def test_less_target_like_outranks_unrelated(pool):
    block = {"name": "less", "target": TARGET_CODE,
             "scorer": {"proxy_steps": 15, "warmup_epochs": 2, "warmup_batch_size": 8, "warmup_fraction": 0.3,
                        "max_length": 96, "proj_dim": 64, "max_target": 8}}
    result, domains = score(block, pool)
    assert_target_outranks(result.scores, domains)
    # one checkpoint per warm-up epoch, weighted by its average LR (normalized)
    weights = result.info["checkpoint_weights"]
    assert len(weights) == 2 and abs(sum(weights) - 1) < 1e-3


def test_dsir_selection_prefers_target_domain(pool, tmp_path):
    # min_length 0: the fixture's documents are shorter than the paper's 100-token minimum
    sel = build({"name": "dsir", "target": TARGET_CODE, "budget": {"fraction": 0.2}, "scorer": {"min_length": 0}},
                pool, tmp_path)
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


def test_perplexity_keeps_one_window_of_the_sorted_losses(pool, reference_model, tmp_path):
    """The kept examples are consecutive in the order of their losses, centred on the median (position: medium),
    and hold the budget -- not a random sample inside a quantile band."""
    block = {"name": "perplexity", "scorer": {"model_path": str(reference_model), "max_length": 64},
             "budget": {"fraction": 0.3, "unit": "examples"}}
    sel = build(block, pool, tmp_path)
    lines = [json.loads(x) for x in open(Path(sel.manifest_path).parent / "selected.jsonl")]
    result, _ = score(block, pool)
    n = len(result.scores)
    assert len(lines) == round(0.3 * n)
    ranks = np.argsort(np.argsort(result.scores, kind="stable"), kind="stable")
    kept = np.sort(ranks[[r["index"] for r in lines]])
    assert (np.diff(kept) == 1).all(), kept                       # one contiguous window
    assert abs((kept[0] + kept[-1]) / 2 - (n - 1) / 2) <= 1        # centred on the median


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


S2L_FAST = {"proxy_epochs": 2, "proxy_batch_size": 16, "checkpoints": 4, "num_clusters": 3, "max_length": 64,
            "batch_size": 64}


def test_s2l_trajectories_are_training_losses_over_epochs(pool):
    """The proxy makes proxy_epochs full passes over the candidates (every one is a training example), and the
    trajectory points are evenly spaced over those updates, the last at the end."""
    from effitrain.selection.scorers.s2l import record_steps

    result, domains = score({"name": "s2l", "scorer": S2L_FAST}, pool)
    steps_per_epoch = -(-len(domains) // 16)
    assert result.info["proxy_steps"] == 2 * steps_per_epoch
    assert result.info["trajectory_points"] == 4
    assert steps_per_epoch == 8 and record_steps(16, 4) == [4, 8, 12, 16]  # the 2nd point ends epoch 1
    # the proxy learnt its training data: the final loss (score = minus it) is below the first logged loss
    assert -result.scores.mean() < result.info["proxy_first_loss"]


def test_train_epochs_sees_every_example_once_per_epoch():
    from types import SimpleNamespace

    from effitrain.selection.refmodel import byte_proxy, train_epochs

    texts = [f"document number {i}" for i in range(10)]
    ds = datasets.Dataset.from_dict({"text": texts})
    model, encode = byte_proxy(SimpleNamespace(proxy_hidden_size=8, proxy_layers=1, max_length=32, device="cpu"), 0)
    seen: list[str] = []

    def spy(batch):
        seen.extend(batch)
        return encode(batch)

    train_epochs(model, spy, ds, epochs=3, batch_size=4, lr=1e-3, seed=0, device="cpu")
    assert sorted(seen) == sorted(texts * 3)
    assert all(sorted(seen[k * 10:(k + 1) * 10]) == sorted(texts) for k in range(3))   # each epoch: all, once


def test_s2l_clusters_each_domain_and_shares_the_budget_over_domains(pool, tmp_path):
    result, domains = score({"name": "s2l", "scorer": S2L_FAST}, pool)
    names = np.unique(domains)
    assert (names[result.groups] == domains).all()                  # groups are the domains
    for c in np.unique(result.clusters):                            # every cluster lies inside one domain
        assert len(set(domains[result.clusters == c])) == 1
    assert len(np.unique(result.clusters)) == 3 * len(names)        # num_clusters per domain

    sel = build({"name": "s2l", "scorer": S2L_FAST, "budget": {"fraction": 0.3, "unit": "examples"}}, pool, tmp_path)
    kept = sel.info["kept_domains"]
    assert sum(kept.values()) == 36 and sorted(kept.values()) == [12, 12, 12], kept


# ------------------------------------------------------------------------------------------------ selectors

def test_cluster_balanced_selector_passes_leftover_on():
    from effitrain.selection.selectors import ClusterBalancedSelector

    clusters = np.array([0] * 2 + [1] * 10 + [2] * 20)
    sel = ClusterBalancedSelector(REGISTRY.parse("selector", {"name": "cluster_balanced"}, "s").params)
    idx = sel.select(np.zeros(32), clusters, np.ones(32), 12, np.random.default_rng(0))
    assert np.bincount(clusters[idx]).tolist() == [2, 5, 5]


def test_cluster_balanced_per_source_drops_clusters_of_two():
    """S2L's sampling: equal shares over sources (smallest first, a small source gives all it has), then equal
    shares over the clusters of more than 2 members inside a source; a 2-member cluster gets nothing."""
    from effitrain.selection.selectors import ClusterBalancedSelector

    params = REGISTRY.parse("selector", {"name": "cluster_balanced", "per_source": True, "min_cluster_size": 3},
                            "s").params
    groups = np.array([0] * 4 + [1] * 32)
    clusters = np.array([0] * 4 + [1] * 2 + [2] * 10 + [3] * 20)
    idx = ClusterBalancedSelector(params).select(np.zeros(36), clusters, np.ones(36), 16, np.random.default_rng(0),
                                                 groups=groups)
    assert np.bincount(clusters[idx], minlength=4).tolist() == [4, 0, 6, 6]
    # a 2-member cluster only fills what the larger ones cannot
    clusters = np.array([0] * 2 + [1] * 3 + [2] * 3)
    idx = ClusterBalancedSelector(params).select(np.zeros(8), clusters, np.ones(8), 8, np.random.default_rng(0),
                                                 groups=np.zeros(8, dtype=int))
    assert np.bincount(clusters[idx]).tolist() == [2, 3, 3]


@pytest.mark.parametrize("position, expected", [("low", range(0, 20)), ("medium", range(40, 60)),
                                                ("high", range(80, 100))])
def test_window_selector_takes_one_contiguous_window(position, expected):
    from effitrain.selection.selectors import WindowSelector

    rng = np.random.default_rng(0)
    scores = rng.permutation(100).astype(float)           # score = rank
    sel = WindowSelector(REGISTRY.parse("selector", {"name": "window", "position": position}, "s").params)
    idx = sel.select(scores, None, np.ones(100), 20, np.random.default_rng(1))
    assert sorted(scores[idx].astype(int).tolist()) == list(expected)
    # token weights: a window of consecutive ranks that first reaches the budget
    weights = rng.integers(1, 10, 100).astype(float)
    idx = sel.select(scores, None, weights, 0.25 * weights.sum(), np.random.default_rng(1))
    ranks = np.sort(scores[idx].astype(int))
    assert (np.diff(ranks) == 1).all()
    assert weights[idx].sum() >= 0.25 * weights.sum() > weights[idx].sum() - weights[idx].max()


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
    block = {"name": "dsir", "target": {"path": [str(path)], "text_field": "content"}, "budget": {"fraction": 0.2},
             "scorer": {"min_length": 0}}
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
    ({"name": "less", "target": {"domain": "code"}, "scorer": {"adam_betas": [0.9]}},
     "selection.scorer.adam_betas: two numbers in [0, 1)"),
    ({"name": "less", "target": {"domain": "code", "task_field": "task"}}, "selection.target.task_field: a domain"),
    ({"name": "random", "budget": {"fraction": 0}}, "selection.budget.fraction: 0.0 is out of range"),
    ({"name": "perplexity", "scorer": {"model_path": "m"}, "selector": {"name": "band", "low": 0.9, "high": 0.1}},
     "selection.selector.low: 0.9 must be below"),
    ({"name": "perplexity", "selector": {"position": "middle"}}, "selection.selector.position"),
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


# ------------------------------------------------------------------------------------------------ DSIR estimator

def test_dsir_features_are_the_authors_wordpunct_ngrams():
    """Lower-cased NLTK WordPunct tokens (word runs, punctuation runs), unigrams + bigrams, sha256 mod buckets."""
    import hashlib

    from effitrain.selection.scorers.dsir import hashed_ngrams

    grams = ["don", "'", "t", "stop", "!!", "don '", "' t", "t stop", "stop !!"]
    expected = [int(hashlib.sha256(g.encode()).hexdigest(), 16) % 10000 for g in grams]
    assert hashed_ngrams("Don't STOP!!", 10000, 2) == expected


def _dsir_pool(texts):
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                                          "domain": ["x"] * len(texts)}),
        eval=datasets.Dataset.from_dict({"id": ["e"], "text": ["e"], "domain": ["x"]}))


def test_dsir_pool_mix_0_is_the_papers_estimate(tmp_path):
    """Pool "a b", "a c"; target "a b".  Raw counts a:2 b:1 c:1 ab:1 ac:1 (sum 6), target a:1 b:1 ab:1 (sum 3), no
    pseudo-counts; log w = log(p_t + 1e-8) - log(p_raw + 1e-8); a document's score sums it over its n-grams."""
    from effitrain.selection.base import Context, add_token_counts
    from effitrain.selection.scorers.dsir import hashed_ngrams

    assert len(set(hashed_ngrams("a b", 2 ** 20, 2) + hashed_ngrams("a c", 2 ** 20, 2))) == 5  # no collision
    pool = _dsir_pool(["a b", "a c"])
    target = datasets.Dataset.from_dict({"text": ["a b"]})

    def scores(**scorer):
        params = parse({"name": "dsir", "target": {"path": ["unused"]},
                        "scorer": {"num_buckets": 2 ** 20, "min_length": 0, **scorer}}).params
        cand = pool["train"].map(add_token_counts, batched=True)
        return params.scorer_block.build().score(cand, Context(target=target, seed=0)).scores

    log = np.log
    seen = log(1 / 3 + 1e-8) - log(1 / 6 + 1e-8)             # b and "a b": log 2
    unseen = log(1e-8) - log(1 / 6 + 1e-8)                    # c and "a c": never in the target
    a = log(1 / 3 + 1e-8) - log(2 / 6 + 1e-8)                 # 0
    np.testing.assert_allclose(scores(pool_mix=0.0), [a + 2 * seen, a + 2 * unseen], rtol=1e-12)
    # our pool_mix bounds an unseen n-gram's penalty to about log(pool_mix)
    mixed = scores(pool_mix=0.1)
    unseen_mixed = log(0.1 / 6 + 1e-8) - log(1 / 6 + 1e-8)
    a_mixed = log(0.9 / 3 + 0.1 * 2 / 6 + 1e-8) - log(2 / 6 + 1e-8)
    np.testing.assert_allclose(mixed[1], a_mixed + 2 * unseen_mixed, rtol=1e-12)
    # target_smoothing is a pseudo-count on the target only: 1 per bucket over 2**20 buckets
    smoothed = scores(target_smoothing=1.0)
    p_t_unseen = 1 / (3 + 2 ** 20)
    p_t_a = 2 / (3 + 2 ** 20)
    expected = log(p_t_a + 1e-8) - log(2 / 6 + 1e-8) + 2 * (log(p_t_unseen + 1e-8) - log(1 / 6 + 1e-8))
    np.testing.assert_allclose(smoothed[1], expected, rtol=1e-12)


def test_dsir_drops_documents_below_the_minimum_length(tmp_path):
    long_doc = " ".join(["word"] * 12)
    pool = _dsir_pool(["too short .", long_doc, long_doc + " more", "also short"])
    target = tmp_path / "t.jsonl"
    target.write_text(json.dumps({"text": long_doc}) + "\n")
    sel = build({"name": "dsir", "target": {"path": [str(target)]}, "budget": {"fraction": 1.0},
                 "scorer": {"min_length": 10}}, pool, tmp_path)
    assert sorted(sel.train["id"]) == ["d1", "d2"]
    assert sel.info["scorer_below_min_length"] == 2
    # a filter that leaves nothing is a configuration error naming the key
    with pytest.raises(ConfigError, match=r"selection.scorer.min_length: every candidate has fewer than 100 "):
        build({"name": "dsir", "target": {"path": [str(target)]}}, pool, tmp_path)


# ------------------------------------------------------------------------------------------------ LESS features

def test_less_adam_feature_by_hand():
    """LESS's training feature: one more Adam moment update with the gradient, then m' / sqrt(v' + eps)."""
    import torch

    from effitrain.selection.scorers.less import adam_feature

    g, m, v = torch.tensor([1.0, -2.0]), torch.tensor([0.1, 0.2]), torch.tensor([0.01, 0.04])
    # m' = 0.9 m + 0.1 g = [0.19, -0.02];  v' = 0.999 v + 0.001 g^2 = [0.01099, 0.04396]
    expected = [0.19 / (0.01099 + 1e-8) ** 0.5, -0.02 / (0.04396 + 1e-8) ** 0.5]
    np.testing.assert_allclose(adam_feature(g, m, v).numpy(), expected, rtol=1e-6)


def test_less_per_example_gradients_are_each_examples_own():
    """The batched per-example LoRA gradients equal autograd's gradient of each example's loss taken alone."""
    import torch
    from types import SimpleNamespace

    from effitrain.selection.refmodel import byte_proxy, token_losses
    from effitrain.selection.scorers.less import GradientFeatures, lora_model

    p = SimpleNamespace(proxy_hidden_size=16, proxy_layers=1, max_length=40, device="cpu", lora_r=2, lora_alpha=8,
                        lora_dropout=0.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model, encode = byte_proxy(p, 0)
    model = lora_model(model, p)
    with torch.no_grad():  # LoRA's B starts at zero; give it values so that A gets a gradient too
        for n, w in model.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.1)
    model.eval()
    feats = GradientFeatures(model, encode, "cpu", batch_size=2)
    texts = ["a short one", "a somewhat longer example text"]
    batched = feats.grads(texts)
    for i, t in enumerate(texts):
        ids, mask = encode([t])
        model.zero_grad()
        token_losses(model, ids, mask).sum().backward()
        alone = torch.cat([m.weight.grad.reshape(-1) for _, m in feats.layers])
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-6)
    # the flat order of the optimizer moments is the same as the gradients'
    opt = torch.optim.AdamW([m.weight for _, m in feats.layers])
    for _, m in feats.layers:
        m.weight.grad = torch.ones_like(m.weight)
    opt.step()
    assert feats.flat_state(opt, "exp_avg").shape == batched[0].shape


def test_less_weights_checkpoints_by_average_lr_and_takes_the_best_task():
    from effitrain.selection.scorers.less import combine

    # 2 candidates x 3 target examples at 2 checkpoints; tasks: examples 0, 1 -> "a", example 2 -> "b"
    s1 = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    s2 = np.array([[0.0, 1.0, 0.0], [0.2, 0.2, 0.2]])
    lrs = [1e-3, 3e-3]                                     # weights 0.25, 0.75
    total = 0.25 * s1 + 0.75 * s2                          # [[.25, .75, .125], [.15, .15, .4]]
    by_task = np.stack([total[:, :2].mean(1), total[:, 2]], 1)  # [[.5, .125], [.15, .4]]
    np.testing.assert_allclose(combine([s1, s2], lrs, np.array(["a", "a", "b"])), by_task.max(1))
    np.testing.assert_allclose(combine([s1, s2], lrs, np.array(["a", "a", "b"])), [0.5, 0.4])


def test_warmup_checkpoint_lr_is_the_epochs_average_of_the_schedule():
    """Linear schedule with warm-up, as transformers': 8 updates, warmup_ratio 0.25 -> 2 warm-up steps."""
    from types import SimpleNamespace

    from effitrain.selection.refmodel import byte_proxy, train_epochs

    ds = datasets.Dataset.from_dict({"text": [f"text {i}" for i in range(8)]})
    model, encode = byte_proxy(SimpleNamespace(proxy_hidden_size=8, proxy_layers=1, max_length=16, device="cpu"), 0)
    epochs = []
    train_epochs(model, encode, ds, epochs=2, batch_size=2, lr=0.1, seed=0, device="cpu", schedule="linear",
                 warmup_ratio=0.25, on_epoch=lambda e, opt, lrs: epochs.append(lrs))
    factors = [0, 1 / 2, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    np.testing.assert_allclose(epochs[0], [0.1 * f for f in factors[:4]])
    np.testing.assert_allclose(epochs[1], [0.1 * f for f in factors[4:]])


def test_less_target_tasks_come_from_task_field(pool, tmp_path):
    rng = random.Random(7)
    path = tmp_path / "tasks.jsonl"
    rows = [{"text": code_doc(rng), "kind": "code"} for _ in range(3)] + \
           [{"text": arith_doc(rng), "kind": "arith"} for _ in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = {"name": "less", "target": {"path": [str(path)], "task_field": "kind"},
             "scorer": {"proxy_steps": 3, "warmup_epochs": 1, "warmup_batch_size": 8, "max_length": 48,
                        "proj_dim": 16}}
    result, _ = score(block, pool)
    assert result.info["target_tasks"] == 2 and result.info["target_used"] == 6


# ------------------------------------------------------------------------------------------------ pool proxy

def test_reference_scorers_without_model_path_train_then_reuse_a_cached_proxy(pool, tmp_path, caplog):
    """perplexity and diversity_kmeans need no model_path: the first one trains a byte-level proxy on the pool
    (and says so), caches it next to the manifests; the next one with the same proxy inputs loads it."""
    import logging

    proxy = {"proxy_steps": 5, "max_length": 48}
    with caplog.at_level(logging.INFO, logger="effitrain.selection"):
        first = build({"name": "perplexity", "scorer": proxy, "budget": {"fraction": 0.3}}, pool, tmp_path)
    assert first.info["scorer_proxy"] == "trained" and first.info["scorer_reference"] == "pool proxy"
    assert "training a byte-level proxy" in caplog.text
    proxy_dir = Path(first.info["scorer_proxy_dir"])
    assert proxy_dir.parent == tmp_path and (proxy_dir / "proxy.json").is_file()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="effitrain.selection"):
        other = build({"name": "diversity_kmeans", "scorer": {**proxy, "num_clusters": 3}}, pool, tmp_path)
        again = build({"name": "perplexity", "scorer": proxy, "budget": {"fraction": 0.2}}, pool, tmp_path)
    assert other.info["scorer_proxy"] == again.info["scorer_proxy"] == "reused"
    assert other.info["scorer_proxy_dir"] == again.info["scorer_proxy_dir"] == str(proxy_dir)
    assert "reusing the byte-level proxy" in caplog.text and "training a byte-level proxy" not in caplog.text
    # another proxy parameter is another proxy
    third = build({"name": "perplexity", "scorer": {**proxy, "proxy_steps": 6}}, pool, tmp_path)
    assert third.info["scorer_proxy"] == "trained" and third.info["scorer_proxy_dir"] != str(proxy_dir)


def test_zip_fit_is_one_minus_mean_gzip_ncd():
    """ZIP-FIT (authors' ZIPFIT.similarity): C = gzip length, x t concatenated without a separator."""
    import gzip

    from effitrain.selection.scorers.zip_fit import ncd_scores

    def c(b):
        return len(gzip.compress(b, compresslevel=9, mtime=0))

    x, targets = "the river crossed the bridge", [b"the bridge over the river", b"x = 1 + 2"]
    ncd = [(c(x.encode() + t) - min(c(x.encode()), c(t))) / max(c(x.encode()), c(t)) for t in targets]
    assert ncd_scores([x], targets, [c(t) for t in targets], 2000, 9) == [1 - sum(ncd) / 2]


def test_less_scores_candidates_with_each_checkpoints_adam_moments(pool, monkeypatch):
    """Every candidate's feature goes through adam_feature with the moments of each warm-up checkpoint in turn."""
    from effitrain.selection.scorers import less

    seen = []
    real = less.adam_feature

    def spy(g, m, v, betas, eps):
        seen.append((g.shape[0], float(m.abs().sum()), float(v.sum())))
        return real(g, m, v, betas, eps)

    monkeypatch.setattr(less, "adam_feature", spy)
    block = {"name": "less", "target": TARGET_CODE,
             "scorer": {"proxy_steps": 3, "warmup_epochs": 2, "warmup_batch_size": 4, "max_length": 32,
                        "proj_dim": 16, "max_target": 4, "batch_size": 64}}
    result, domains = score(block, pool)
    moments = sorted({(m, v) for _, m, v in seen})
    assert len(moments) == 2 and all(v > 0 for _, v in moments)        # two checkpoints, real Adam state
    assert sum(n for n, _, _ in seen) == 2 * len(domains)                # every candidate at each checkpoint
