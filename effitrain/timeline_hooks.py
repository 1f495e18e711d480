"""The engine hooks that carry the timeline into a run; the loop itself reads no timeline quantity.

* :class:`SequenceLengthHook` (when ``timeline.seq_len`` is declared): at ``batch_start`` it cuts each packed
  ``[B, L]`` micro-batch into ``[B*L/l, l]`` with ``l = timeline.value("seq_len", step)``.  Rows are independent
  sequences for a causal LM, so no token attends across a cut, and the tokens per step stay ``B*L``; what changes is
  the context the model sees (and the first token of each piece, which no longer has a prediction target).
* :class:`TimelineRecord` (whenever a timeline is declared): keeps the resolved timeline (in steps) in every
  checkpoint.  On resume the past must be the same — a timeline that would have given different values before the
  checkpoint's step is refused (the weights were trained under the old one); a changed future (e.g. a fraction-based
  breakpoint that moves because train.max_steps grew) is allowed and reported in one line.
"""

from __future__ import annotations

from typing import Any

from effitrain.engine.events import Hook
from effitrain.registry import ConfigError
from effitrain.timeline import Timeline


class SequenceLengthHook(Hook):
    name = "timeline_seq_len"

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    def on_batch_start(self, state: Any) -> None:
        length = self.timeline.value("seq_len", state.step)
        batch = state.batch
        if batch["input_ids"].shape[1] != length:
            state.batch = {k: v.reshape(-1, length) if k in ("input_ids", "labels") else v for k, v in batch.items()}


class TimelineRecord(Hook):
    name = "timeline"

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.step = 0

    def on_step_end(self, state: Any) -> None:
        self.step = state.step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "timeline": self.timeline.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from effitrain.console import say

        self.step = int(state["step"])
        before = Timeline.from_dict(state["timeline"])
        past = before.first_difference(self.timeline, self.step)
        if past:
            raise ConfigError(f"timeline: the resumed run's timeline differs before the checkpoint's step "
                              f"{self.step} ({past}); resume with the timeline the run was trained with")
        future = before.first_difference(self.timeline, max(before.max_steps, self.timeline.max_steps) + 1)
        if future:
            say(f"timeline: from step {self.step} on the schedule changes ({future}); the steps before it are "
                f"unchanged")


def timeline_hooks(timeline: Timeline) -> list[Hook]:
    """The hooks a run with ``timeline`` needs (none for an empty timeline)."""
    if not timeline:
        return []
    hooks: list[Hook] = [TimelineRecord(timeline)]
    if timeline.declares("seq_len"):
        hooks.append(SequenceLengthHook(timeline))
    return hooks
