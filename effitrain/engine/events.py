"""Engine events and the hook base class that methods subclass.

A method that acts during training (LISA's layer switching, a curriculum's pacing, an online mixture's weight
update, model growth, ...) is a :class:`Hook` registered in the ``method`` group.  The engine calls
``on_<event>(state)`` on every hook that overrides it, in the order the hooks were configured, and saves each hook's
``state_dict()`` in every checkpoint.  The engine itself never asks which method is running.
"""

from __future__ import annotations

from typing import Any

EVENTS = ("fit_start", "batch_start", "after_forward", "after_backward", "step_end", "eval_end", "checkpoint",
          "fit_end")


class Hook:
    """Base class of a training method.  Override only the events you need; the rest cost nothing."""

    #: the registry name, set by the builder; used as the key of this hook's state in checkpoints
    name: str = "hook"

    def on_fit_start(self, state: Any) -> None: ...
    def on_batch_start(self, state: Any) -> None: ...
    def on_after_forward(self, state: Any) -> None: ...
    def on_after_backward(self, state: Any) -> None: ...
    def on_step_end(self, state: Any) -> None: ...
    def on_eval_end(self, state: Any) -> None: ...
    def on_checkpoint(self, state: Any) -> None: ...
    def on_fit_end(self, state: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a resume (RNG state, schedules, counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EventBus:
    """Dispatches events to the hooks that override them; events nobody handles are a dictionary miss."""

    def __init__(self, hooks: list[Hook]) -> None:
        names = [h.name for h in hooks]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"two hooks share the name(s) {sorted(duplicates)}; checkpoint state would collide")
        self.hooks = list(hooks)
        self._handlers = {
            event: [getattr(h, f"on_{event}") for h in hooks
                    if getattr(type(h), f"on_{event}") is not getattr(Hook, f"on_{event}")]
            for event in EVENTS
        }

    def emit(self, event: str, state: Any) -> None:
        for handler in self._handlers[event]:
            handler(state)

    def state_dict(self) -> dict[str, Any]:
        return {h.name: h.state_dict() for h in self.hooks}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for hook in self.hooks:
            if hook.name in states:
                hook.load_state_dict(states[hook.name])
