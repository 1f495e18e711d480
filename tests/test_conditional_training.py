"""Conditional training (dataset.control_tokens, recipe conditional_training): each segment of a training document
gets <|good|> or <|bad|> from a scorer's rating against a threshold (score <= threshold is good, the authors' rule),
a seeded share of segments gets none, the tokens are added special tokens of the run's tokenizer and its model's
embedding, and they sit in the packed rows right where the segments start -- in the labels, as the authors' MLE."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from effitrain.config.compose import compose_config
from effitrain.config.spec import validate
from effitrain.data.conditional import conditioned_texts, split_segments, threshold_for
from effitrain.registry import ConfigError


def _control(**changes):
    values = dict(scorer={"name": "uniform"}, good_when="low", threshold=None, bad_fraction=0.95, segment="sentence",
                  drop_token_fraction=0.0, good_token="<|good|>", bad_token="<|bad|>", seed=0)
    return SimpleNamespace(**{**values, **changes})


def test_segments_keep_their_trailing_whitespace_and_join_back_to_the_document():
    text = 'One. Two!  "Three?"\nFour... five'
    assert split_segments(text, "sentence") == ["One. ", "Two!  ", '"Three?"\n', "Four... ", "five"]
    assert split_segments("a = 1\nb = 2.\n\nc", "line") == ["a = 1\n", "b = 2.\n", "\n", "c"]
    assert split_segments(text, "document") == [text] and split_segments("", "sentence") == []
    for how in ("sentence", "line", "document"):
        assert "".join(split_segments(text, how)) == text


def test_the_threshold_labels_the_chosen_share_of_the_worst_segments_bad():
    scores = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    # 2 of 5 bad: the 3 lowest (1, 1.5, 3) are good, so the threshold is 3 (score <= 3 is good)
    assert threshold_for(scores, "low", 0.4) == 3.0
    # good_when high: the 3 highest (3, 4, 9) are good, score >= 3
    assert threshold_for(scores, "high", 0.4) == 3.0
    assert threshold_for(scores, "low", 0.2) == 4.0 and threshold_for(scores, "high", 0.2) == 1.5


def test_every_segment_gets_the_token_of_its_rating():
    docs = ["Hi. Hello there. ", "Yo."]
    rated = []

    def by_length(segments):  # a stand-in scorer: a segment's length (longer = worse)
        rated.append(list(segments))
        return np.array([len(s) for s in segments], dtype=float)

    out, info = conditioned_texts(docs, _control(threshold=5.0, bad_fraction=None), by_length)
    assert rated == [["Hi. ", "Hello there. ", "Yo."]]          # all documents' segments rated in one call
    assert out == ["<|good|>Hi. <|bad|>Hello there. ", "<|good|>Yo."]
    assert info == {"segments": 3, "good": 2, "bad": 1, "without_token": 0, "threshold": 5.0, "good_when": "low"}
    high, _ = conditioned_texts(docs, _control(threshold=5.0, bad_fraction=None, good_when="high"), by_length)
    assert high == ["<|bad|>Hi. <|good|>Hello there. ", "<|bad|>Yo."]


def test_a_seeded_share_of_segments_gets_no_token():
    docs = [" ".join(f"Sentence {i}." for i in range(j * 50, j * 50 + 50)) for j in range(20)]
    params = _control(drop_token_fraction=0.1)
    out, info = conditioned_texts(docs, params, lambda s: np.zeros(len(s)))
    assert info["segments"] == 1000 and info["good"] + info["without_token"] == 1000 and info["bad"] == 0
    expected_drops = int((np.random.default_rng([0, 2302_08582]).random(1000) < 0.1).sum())
    assert info["without_token"] == expected_drops and 60 < expected_drops < 140
    assert sum(text.count("<|good|>") for text in out) == 1000 - expected_drops
    assert [text.replace("<|good|>", "") for text in out] == docs     # the text itself is untouched
    assert conditioned_texts(docs, params, lambda s: np.zeros(len(s)))[0] == out   # same seed, same drops


def test_invalid_settings_are_refused_naming_the_key():
    def check(*overrides):
        composed = compose_config(["+recipe=conditional_training", *overrides])
        validate(composed.cfg, composed.recipes)

    check()
    with pytest.raises(ConfigError, match=r"^dataset.control_tokens: set one of dataset.control_tokens.threshold "
                                          r"and dataset.control_tokens.bad_fraction"):
        check("dataset.control_tokens.threshold=0.5")
    with pytest.raises(ConfigError, match=r"^dataset.control_tokens.scorer.name: scorer 'dsir' needs target data"):
        check("~dataset.control_tokens.scorer", "+dataset.control_tokens.scorer={name: dsir}")
    with pytest.raises(ConfigError, match=r"^dataset.control_tokens.segment: 'word' is not one of"):
        check("dataset.control_tokens.segment=word")


def test_packed_rows_carry_a_control_token_at_every_document_start(tmp_path):
    """The real data path (demo corpus -> BPE -> control tokens -> packing), with the uniform scorer (every score 0,
    so every segment is good) and no dropping: after every end-of-document token inside a row comes <|good|>."""
    from datasets import DatasetDict

    from effitrain.data.packing import to_numpy
    from effitrain.data.splits import build_packed_splits
    from effitrain.config.blocks import load_builtin_blocks
    from effitrain.registry import REGISTRY

    load_builtin_blocks()
    dataset = REGISTRY.parse("dataset", {"name": "demo", "max_docs_per_domain": 30, "eval_examples_per_domain": 4,
                                         "seq_len": 64, "control_tokens": {"scorer": {"name": "uniform"},
                                                                           "drop_token_fraction": 0.0}}, "dataset")
    model = REGISTRY.parse("model", {"name": "llama", "vocab_size": 300}, "model")
    raw = dataset.build()
    tokenizer, packed, _ = build_packed_splits(dataset.params, model.params, DatasetDict(train=raw["train"],
                                                                                         eval=raw["eval"]))
    good, bad = tokenizer.convert_tokens_to_ids(["<|good|>", "<|bad|>"])
    assert (good, bad) == (300, 301) and len(tokenizer) == 302     # two new ids after the BPE's own 300
    assert tokenizer("<|good|>Hello")["input_ids"][0] == good    # one token, never split or merged
    assert tokenizer.decode([good, *tokenizer("Hello")["input_ids"]], skip_special_tokens=True) == "Hello"
    rows = to_numpy(packed)
    eos_positions = np.argwhere(rows[:, :-1] == tokenizer.eos_token_id)
    assert len(eos_positions) > 20
    assert all(rows[r, c + 1] == good for r, c in eos_positions)
    assert not (rows == bad).any()                                 # uniform scores: all at the threshold, all good
    # sentences start after ". ": many more control tokens than documents
    assert (rows == good).sum() > 2 * len(eos_positions)


@pytest.mark.slow
def test_the_recipe_trains_with_the_tokens_in_its_tokenizer_and_embedding(tmp_path, train_in_process):
    run_dir = tmp_path / "run"
    summary = train_in_process(["+recipe=conditional_training", "train.max_steps=2",
                                "dataset.control_tokens.scorer.proxy_steps=4",
                                "dataset.control_tokens.scorer.max_length=48"], run_dir)
    assert summary["finished"]
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "final_model"))
    ids = tokenizer.convert_tokens_to_ids(["<|good|>", "<|bad|>"])
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1] and ids[0] >= 512   # after TINY's 512 BPE entries
    assert AutoConfig.from_pretrained(str(run_dir / "final_model")).vocab_size == len(tokenizer)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_bytes().splitlines()]
    assert {s["prompt"] for s in samples} >= {"<|good|>", "<|bad|>", "<|good|>The purpose of this module is"}
    assert all("<|good|>" not in s["completion"] and "<|bad|>" not in s["completion"] for s in samples)
