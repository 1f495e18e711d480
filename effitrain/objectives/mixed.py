"""``objective: mixed``: the weighted sum of several objectives in one stage, each on its own data stream.

Per optimizer step the weights are fixed once (at the step's first micro-batch): from the schedule (``weight``,
``every``, or ``timeline.objective_weights``) or from a controller (:mod:`effitrain.objectives.mix_controllers`)
that overrides the components it governs.  Per micro-batch the loss is ``sum_i w_i L_i`` over the components with
``w_i > 0``; a component with weight 0 is not computed at all (a GRPO component then samples nothing), and its own
stream does not advance.  A component on ``data: stage`` trains on the loop's batch; one with a mapping of dataset
keys draws from a stream of its own (the stage's dataset with those keys, packed with the run's tokenizer, visited in
a fresh seeded permutation every pass); one on ``data: buffer`` gets the rows its controller collected.

Everything a resumed run needs -- each own stream's position, the controller's state (relift's buffer, sasr's
gradient norms), the components' own state -- is in :meth:`Mixed.state_dict`, which the loop saves in each rank's
checkpoint file, so a run stopped mid-stage repeats the uninterrupted one's weights and losses.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import numpy as np
import torch

from effitrain.engine.events import Hook
from effitrain.errors import RunFailed
from effitrain.registry import ConfigError

#: metric prefix of the weight each component had on a micro-batch
WEIGHT_METRIC = "mix_weight/"


class OwnStream:
    """A component's own rows: a seeded permutation per pass, each rank its slice of every global micro-batch."""

    def __init__(self, rows: np.ndarray, *, seed: int, micro_batch_size: int, world_size: int, rank: int) -> None:
        self.rows, self.seed = rows, seed
        self.micro_batch_size, self.world_size, self.rank = micro_batch_size, world_size, rank
        self.position = 0   # global micro-batches drawn so far
        self._perm: dict[int, np.ndarray] = {}

    def indices(self) -> list[int]:
        n, mb = len(self.rows), self.micro_batch_size
        start = (self.position * self.world_size + self.rank) * mb
        out = []
        for k in range(start, start + mb):
            epoch = k // n
            if epoch not in self._perm:
                self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
            out.append(int(self._perm[epoch][k % n]))
        return out

    def next_batch(self, device: Any) -> dict[str, Any]:
        rows = self.rows[self.indices()]
        self.position += 1
        return rows_to_batch(torch.from_numpy(np.ascontiguousarray(rows)).to(device, dtype=torch.long))


def rows_to_batch(ids: torch.Tensor) -> dict[str, Any]:
    """Stored rows to a batch, as the loop does it (chat rows carry labels and position ids)."""
    if ids.dim() > 2:
        from effitrain.data.chat import to_batch

        return to_batch(ids)
    return {"input_ids": ids, "labels": ids}


class Component:
    def __init__(self, spec: Any, objective: Any, stream: Optional[OwnStream]) -> None:
        self.spec, self.objective, self.stream = spec, objective, stream
        self.name = spec.name


class Mixed:
    def __init__(self, components: list[Component], controller: Any, *, grad_accum: int) -> None:
        self.components, self.controller, self.grad_accum = components, controller, grad_accum
        self.step_weights: dict[str, float] = {}
        self._weights_step: Optional[int] = None
        self.hooks = tuple(h for c in components for h in getattr(c.objective, "hooks", ())) + (MixedHook(self),)

    # ------------------------------------------------------------------------------------------ weights
    def scheduled(self, state: Any) -> dict[str, float]:
        timeline = getattr(state, "timeline", None)
        weights = timeline.value("objective_weights", state.step) \
            if timeline is not None and timeline.declares("objective_weights") else None
        return {c.name: c.spec.scheduled_weight(state.step, weights) for c in self.components}

    def weights(self, state: Any) -> dict[str, float]:
        """The weights of ``state.step``, decided once at its first micro-batch."""
        if self._weights_step != state.step:
            weights = self.scheduled(state)
            if self.controller is not None:
                weights.update(self.controller.weights(state))
            self.step_weights, self._weights_step = weights, state.step
        return self.step_weights

    # ------------------------------------------------------------------------------------------ the loss
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        weights = self.weights(state)
        device = batch["input_ids"].device
        total: Optional[torch.Tensor] = None
        metrics: dict[str, Any] = {}
        for c in self.components:
            w = weights[c.name]
            metrics[WEIGHT_METRIC + c.name] = torch.tensor(float(w), device=device)
            if w == 0:
                continue
            if c.spec.data == "stage":
                own = batch
            elif c.spec.data == "buffer":
                own = self.controller.buffer_batch(c.name, state, device)
            else:
                own = c.stream.next_batch(device)
            loss, parts = c.objective(model, own, state)
            if self.controller is not None:
                self.controller.observe(c.name, own, state)
            total = w * loss if total is None else total + w * loss
            metrics[f"{c.name}/loss"] = loss.detach()
            metrics.update({f"{c.name}/{k}": v for k, v in parts.items()})
        if total is None:
            raise RunFailed(f"objective=mixed: every component has weight 0 at step {state.step} "
                            f"({weights}); nothing to train on")
        if self.controller is not None:
            metrics.update(self.controller.metrics(device))
        return total, metrics

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"streams": {c.name: c.stream.position for c in self.components if c.stream is not None},
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "components": {c.name: c.objective.state_dict() for c in self.components
                               if hasattr(c.objective, "state_dict")}}

    def load_state_dict(self, state: dict) -> None:
        for c in self.components:
            if c.stream is not None:
                c.stream.position = int(state["streams"][c.name])
            saved = state["components"].get(c.name)
            if saved is not None:
                c.objective.load_state_dict(saved)
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])


class MixedHook(Hook):
    """The engine events a controller reads (sasr: the gradient norm after an SFT step)."""
    name = "objective_mixed"

    def __init__(self, mixed: Mixed) -> None:
        self.mixed = mixed

    def on_after_backward(self, state: Any) -> None:
        if self.mixed.controller is not None and hasattr(self.mixed.controller, "after_backward"):
            self.mixed.controller.after_backward(state, self.mixed.grad_accum)

    def on_step_end(self, state: Any) -> None:
        if self.mixed.controller is not None and hasattr(self.mixed.controller, "step_end"):
            self.mixed.controller.step_end(state, self.mixed.step_weights)


def _accepted(fn: Any, context: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return context
    return {k: v for k, v in context.items() if k in parameters}


def own_rows(dataset_block: Any, model_params: Any, tokenizer: Any) -> np.ndarray:
    """The packed train rows of ``dataset_block`` (the stage's dataset with a component's keys), tokenized as the
    run's own rows are; a tokenizer that differs from the run's is refused (the ids would mean other tokens)."""
    from datasets import DatasetDict

    from effitrain.data.packing import to_numpy
    from effitrain.data.splits import build_packed_splits

    pool = dataset_block.build()
    own_tokenizer, packed, _ = build_packed_splits(dataset_block.params, model_params,
                                                   DatasetDict(train=pool["train"], eval=pool["eval"]),
                                                   tokenizer_corpus=pool["train"])
    if tokenizer is not None and own_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("objective.components: a component's data stream tokenizes with another vocabulary than "
                          "the stage's; override only keys that keep the source (format, domain_by, ...)")
    return to_numpy(packed)


def build(params: Any, *, model: Any, tokenizer: Any = None, dataset_block: Any = None, model_params: Any = None,
          micro_batch_size: int = 1, grad_accum: int = 1, world_size: int = 1, **context: Any) -> Mixed:
    from effitrain.config.blocks.objective_mixed import stream_dataset_block

    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0
    everything = {"model": model, "tokenizer": tokenizer, "grad_accum": grad_accum, "world_size": world_size,
                  **context}
    components = []
    for i, spec in enumerate(params.parsed):
        objective = spec.objective.build(**_accepted(spec.objective.entry.load_builder(), everything))
        stream = None
        if isinstance(spec.data, dict):
            if dataset_block is None:
                raise ConfigError(f"objective.components.{spec.name}.data: a stream of its own needs the stage's "
                                  f"dataset block, which this caller did not pass")
            block = stream_dataset_block(dataset_block, spec.data, f"objective.components.{spec.name}.data")
            stream = OwnStream(own_rows(block, model_params, tokenizer), seed=params.seed + 1000 * (i + 1),
                               micro_batch_size=micro_batch_size, world_size=world_size, rank=rank)
        components.append(Component(spec, objective, stream))
    controller = None
    if params.controller_block is not None:
        controller = params.controller_block.build(tokenizer=tokenizer, seed=params.seed,
                                                   micro_batch_size=micro_batch_size, grad_accum=grad_accum)
    return Mixed(components, controller, grad_accum=grad_accum)
