"""DeepSpeed-Ulysses sequence parallelism (``parallelism.sequence_parallel_size``), through DeepSpeed's own pieces.

Ulysses (Jacobs et al., arXiv 2309.14509) splits every sequence over the ``sp`` processes of a sequence-parallel
group.  Each process embeds, projects and runs the MLPs on its own slice of the tokens; inside attention an
all-to-all swaps the split from the sequence to the heads, so each process attends over the *whole* sequence for
``heads / sp`` heads, and a second all-to-all swaps back.  DeepSpeed ships this for ``transformers`` models as
``UlyssesSPAttentionHF`` (Arctic Long Sequence Training, arXiv 2506.13996): it takes the place of the model's core
attention function, and its ``mpu`` gives DeepSpeed the sequence-parallel and data-parallel groups, so gradients are
averaged over both.  What is left to the framework, and written here:

* **which rows a process trains on**: every process of one group trains on the same rows, so the data-parallel
  rank is ``rank // sp`` and the data-parallel world ``world / sp`` (the curriculum's sampler gets those);
* **the shard**: the tokens ``[c * r, c * (r + 1))`` of each row for group rank ``r`` (``c = seq_len / sp``), with
  their *global* positions (rotary embeddings and the causal mask need them) and their next-token labels shifted
  *before* the split, so the last token of a shard is scored against the first token of the next one;
* **the loss**: the mean over the whole sequence, i.e. the per-shard loss sums added and divided by the total
  token count of the group (the last shard has one labelled token fewer), through a differentiable all-gather so
  that each shard's gradient is weighted by its share.  Gradients then equal those of the unsplit sequence.

Evaluation runs unsplit (``disable_in_eval``): each process scores whole sequences of its share of the held-out
rows, exactly as without sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from effitrain.data.rows import IGNORE_INDEX

#: the batch key of the labels shifted before sharding (transformers' name for pre-shifted labels)
SHIFT_LABELS = "shift_labels"


@dataclass
class SequenceParallel:
    """This process's place in its sequence-parallel group, and the two operations the objective needs."""
    size: int
    rank: int                 # rank inside the group: which slice of each sequence this process holds
    group: Any                # the torch.distributed group of the ``size`` processes sharing sequences
    mpu: Any = None           # DeepSpeed's parallel-state module, handed to deepspeed.initialize
    _restore: Any = None      # undoes the attention registration (a run inside a pipeline is followed by others)
    slice_tokens: Optional[int] = None  # tokens per row in the last slice taken (reported in summary.json)

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This process's slice of a batch of whole rows: ``input_ids``, global ``position_ids`` and pre-shifted
        ``shift_labels`` (``labels`` dropped: shifting inside a slice would lose a label at every boundary)."""
        ids = batch["input_ids"]
        length = ids.shape[1]
        if length % self.size:
            raise ValueError(f"a batch of {length} tokens per row cannot be split over sequence_parallel_size="
                             f"{self.size}; keep every sequence length divisible by it")
        chunk = length // self.size
        cut = slice(chunk * self.rank, chunk * (self.rank + 1))
        self.slice_tokens = chunk
        shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=ids.device).expand(ids.shape[0], -1)
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids", "attention_mask")}
        return {**rest, "input_ids": ids[:, cut], "position_ids": positions[:, cut],
                SHIFT_LABELS: shifted[:, cut].contiguous()}

    def mean(self, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The token-weighted mean of the group's per-shard loss sums (differentiable: every shard's gradient
        arrives through the all-gather's backward)."""
        from torch.distributed.nn.functional import all_gather

        sums = all_gather(loss_sum, group=self.group)
        counts = all_gather(count.to(loss_sum.dtype), group=self.group)
        return torch.stack(sums).sum() / torch.stack(counts).sum().clamp(min=1)

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


def enable(model: Any, *, size: int, micro_batch_size: int) -> Optional[SequenceParallel]:
    """Put DeepSpeed's Ulysses attention in place of ``model``'s core attention and build the groups; None when
    ``size`` is 1.  The model's attention implementation (sdpa or flash_attention_2) stays the one that computes."""
    if size == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[core]
    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=core, sequence_parallel_size=size,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True, disable_in_eval=True)

    def restore() -> None:  # the registration replaces a process-wide function and the groups are module globals
        ALL_ATTENTION_FUNCTIONS[core] = original
        mpu._release_sequence_parallel_groups()

    return SequenceParallel(size=size, rank=mpu.get_sequence_parallel_rank(),
                            group=mpu.get_sequence_parallel_group(), mpu=mpu, _restore=restore)
