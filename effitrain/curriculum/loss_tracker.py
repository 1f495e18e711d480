"""A per-example loss tracker: the latest training loss of every packed row, kept on the device.

Dynamic data-pruning curricula (SeTa, InfoBatch) choose each epoch's rows from the loss every row had the last time
it was trained on.  This hook records those losses without a host sync per step: the values are scattered into a
device tensor at ``after_forward`` and read back only when a curriculum asks for them (:meth:`scores`, once per
epoch) or when a checkpoint is written.

Where the losses come from: the objective publishes the micro-batch's per-example losses as
``batch["example_losses"]`` (``weighted_causal_lm`` does; the model's own ``causal_lm`` loss is one number and has
none).  Which rows they belong to: the sampler that owns this tracker hands out the rows and tells it
(:meth:`expect`), so the tracker needs no index column in the batch.

Several processes: each rank writes the rows of its own micro-batches into ``fresh``/``seen`` buffers; :meth:`scores`
and :meth:`state_dict` (called on every rank at the same point: an epoch boundary, a checkpoint) sum them over the
ranks and fold them into ``values``.  Rows of one epoch are disjoint across ranks, so the sum is the row's loss.

Reusable: any curriculum that needs the current per-example loss can own one (``sampler.hook = tracker``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from effitrain.engine.events import Hook
from effitrain.errors import RunFailed

#: the batch key an objective fills with the micro-batch's per-example losses (shape ``[micro_batch_size]``); the
#: same name as ``effitrain.objectives.common.EXAMPLE_LOSSES`` (not imported: that module imports torch)
EXAMPLE_LOSSES = "example_losses"


class ExampleLossTracker(Hook):
    def __init__(self, num_rows: int, *, initial: float, name: str = "example_losses") -> None:
        self.name = name
        self.num_rows = int(num_rows)
        self.initial = float(initial)
        self._values: Any = None   # torch tensors, made on the first batch's device
        self._fresh: Any = None
        self._seen: Any = None
        self._loaded: Optional[np.ndarray] = None
        self._pending: Optional[list[int]] = None

    # -- recording ---------------------------------------------------------------------------------------------
    def expect(self, rows: list[int]) -> None:
        """The rows of the micro-batch just handed out (called by the owning sampler)."""
        self._pending = list(rows)

    def _buffers(self, device: Any) -> None:
        if self._values is None:
            import torch
            start = self._loaded if self._loaded is not None else np.full(self.num_rows, self.initial)
            self._values = torch.as_tensor(start, dtype=torch.float32, device=device).clone()
            self._fresh = torch.zeros(self.num_rows, dtype=torch.float32, device=device)
            self._seen = torch.zeros(self.num_rows, dtype=torch.float32, device=device)

    def record(self, rows: list[int], losses: Any) -> None:
        import torch
        losses = losses.detach().float().reshape(-1)
        if losses.shape[0] != len(rows):
            raise RunFailed(f"example loss tracker: {losses.shape[0]} per-example losses for a micro-batch of "
                            f"{len(rows)} rows")
        self._buffers(losses.device)
        index = torch.as_tensor(rows, dtype=torch.long, device=losses.device)
        self._fresh[index] = losses
        self._seen[index] = 1.0

    def on_after_forward(self, state: Any) -> None:
        losses = state.batch.get(EXAMPLE_LOSSES) if state.batch is not None else None
        if losses is None:
            raise RunFailed(f"{self.name}: the objective publishes no batch['{EXAMPLE_LOSSES}']; this curriculum reads "
                            f"per-example losses, use objective=weighted_causal_lm")
        if self._pending is None:
            raise RunFailed(f"{self.name}: a micro-batch arrived that the curriculum did not hand out")
        self.record(self._pending, losses)
        self._pending = None

    # -- reading -----------------------------------------------------------------------------------------------
    def _merge(self) -> None:
        """Fold the losses recorded since the last merge (all ranks) into ``values``."""
        if self._values is None:
            return
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._fresh)
            dist.all_reduce(self._seen)
        hit = self._seen > 0
        self._values[hit] = self._fresh[hit] / self._seen[hit]
        self._fresh.zero_()
        self._seen.zero_()

    def scores(self) -> np.ndarray:
        """Every row's latest loss (``initial`` for rows never trained on), the same on every rank."""
        if self._values is None:
            return (self._loaded.copy() if self._loaded is not None
                    else np.full(self.num_rows, self.initial, dtype=np.float32))
        self._merge()
        return self._values.cpu().numpy().copy()

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"num_rows": self.num_rows, "values": self.scores().astype(np.float32)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_rows"]) != self.num_rows:
            raise RunFailed(f"resume: the checkpoint's loss tracker counted {state['num_rows']} rows, this run has "
                            f"{self.num_rows}; the data changed")
        self._loaded = np.asarray(state["values"], dtype=np.float32)
        self._values = self._fresh = self._seen = None
