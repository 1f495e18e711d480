"""The training state that every event hook sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class State:
    spec: Any                      # the validated RunSpec
    run_dir: Path
    rank: int
    world_size: int
    model: Any                     # the trained module (after peft), i.e. the DeepSpeed engine's .module
    engine: Any                    # the DeepSpeed engine
    optimizer: Any                 # the torch optimizer the optimizer block built (DeepSpeed may wrap it)
    scheduler: Any
    sampler: Any                   # the curriculum's resumable batch sampler
    step: int = 0                  # optimizer steps completed
    micro_step: int = 0            # micro-batches processed
    tokens: int = 0                # training tokens seen, all ranks together
    batch: Optional[dict] = None   # the current micro-batch (after batch_start)
    loss: Any = None               # the current micro-batch loss tensor (after after_forward)
    metrics: dict = field(default_factory=dict)       # extra values merged into the next log line
    eval_metrics: dict = field(default_factory=dict)  # the latest evaluation (after eval_end)
    should_stop: bool = False
    stop_reason: Optional[str] = None
    timeline: Any = None           # effitrain.timeline.Timeline in steps: value(name, step), phase(step); None if empty
    sequence_parallel: Any = None  # effitrain.parallel.ulysses.SequenceParallel when sequences are split; else None

    @property
    def data_parallel_size(self) -> int:
        """Processes that train on different rows: the world, less the ones that share a row's sequence."""
        return self.world_size // (self.sequence_parallel.size if self.sequence_parallel is not None else 1)
