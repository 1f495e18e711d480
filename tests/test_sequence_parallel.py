"""DeepSpeed-Ulysses sequence parallelism: each process of a group trains on a slice of every sequence.

The slice keeps the tokens' global positions and labels shifted before the split; two processes that split each
sequence give the same losses as one process that holds it whole (the attention all-to-all is DeepSpeed's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY
from effitrain.objectives.common import IGNORE_INDEX, token_losses
from effitrain.parallel.ulysses import SHIFT_LABELS, SequenceParallel


def _rows():
    ids = torch.arange(16).view(2, 8) + 100  # two rows of 8 tokens, every token distinct
    return {"input_ids": ids, "labels": ids.clone()}


def test_a_slice_keeps_global_positions_and_labels_shifted_before_the_split():
    first = SequenceParallel(size=2, rank=0, group=None).shard(_rows())
    second = SequenceParallel(size=2, rank=1, group=None).shard(_rows())
    ids = _rows()["input_ids"]

    assert torch.equal(first["input_ids"], ids[:, :4]) and torch.equal(second["input_ids"], ids[:, 4:])
    assert first["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert second["position_ids"].tolist() == [[4, 5, 6, 7]] * 2
    # the last token of the first slice is scored against the first token of the second one
    assert torch.equal(first[SHIFT_LABELS], ids[:, 1:5])
    assert torch.equal(second[SHIFT_LABELS][:, :3], ids[:, 5:8])
    assert second[SHIFT_LABELS][:, 3].tolist() == [IGNORE_INDEX] * 2  # nothing follows a row's last token
    assert "labels" not in first and "attention_mask" not in first


def test_the_slices_labels_are_exactly_the_unsplit_sequences_next_token_labels():
    """Scoring each slice against its shift_labels covers the same (position, label) pairs, once each, as the
    next-token loss of the whole row: so the group's token-weighted mean is the unsplit loss."""
    torch.manual_seed(0)
    batch = _rows()
    logits = torch.randn(2, 8, 200)
    whole, mask = token_losses(logits, batch["labels"])
    total, count = torch.zeros(()), 0
    for rank in range(4):
        shard = SequenceParallel(size=4, rank=rank, group=None).shard(_rows())
        piece = logits[:, 2 * rank:2 * rank + 2]
        labels = shard[SHIFT_LABELS]
        keep = labels != IGNORE_INDEX
        total = total + torch.nn.functional.cross_entropy(piece[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    assert count == int(mask.sum()) == 14
    assert (total / count).item() == pytest.approx((whole.sum() / mask.sum()).item(), abs=1e-6)


def test_a_row_that_does_not_split_evenly_is_refused_by_name():
    with pytest.raises(ValueError, match="a batch of 8 tokens per row cannot be split over sequence_parallel_size=3"):
        SequenceParallel(size=3, rank=0, group=None).shard(_rows())


def _metrics(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if "loss" in l], [l["eval_loss"] for l in lines if "eval_loss" in l]


@pytest.mark.multiproc
def test_two_processes_splitting_each_sequence_train_like_one_process(tmp_path):
    """ZeRO-2, two processes, one sequence-parallel group: one data-parallel rank, so the same rows, the same global
    batch and (up to float summation order) the same losses as a single process."""
    common = [*TINY, "train.micro_batch_size=2", "optimizer.lr=3e-3", "parallelism=zero2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    split, whole = tmp_path / "split", tmp_path / "whole"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "effitrain.cli", *common, "parallelism.sequence_parallel_size=2",
                             f"run_dir={split}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "effitrain.cli", *common, f"run_dir={whole}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((split / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2
    assert summary["sequence_parallel"] == {"size": 2, "slice_tokens": 32}  # each process ran 32 of 64 tokens
    assert summary["tokens"] == json.loads((whole / "summary.json").read_text())["tokens"] == 4 * 2 * 64
    loss_split, eval_split = _metrics(split)
    loss_whole, eval_whole = _metrics(whole)
    assert len(loss_split) == 4
    assert loss_split == pytest.approx(loss_whole, abs=1e-4)
    assert eval_split == pytest.approx(eval_whole, abs=1e-4)
