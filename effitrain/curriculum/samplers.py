"""Resumable distributed batch samplers: the order in which packed training rows are seen.

The layout of one epoch
-----------------------
Every epoch has an order of row indices (a permutation for ``shuffle``, the identity for ``sequential``).  With
``B`` = micro-batch size, ``A`` = gradient-accumulation steps and ``W`` = world size, the micro-batch of optimizer
step ``s``, micro step ``m`` (``0 <= m < A``) on rank ``r`` is::

    order[((s * A + m) * W + r) * B : ... + B]

so one optimizer step consumes the contiguous slice ``order[s*A*W*B : (s+1)*A*W*B]`` whatever the split between
processes and accumulation: 1 process with ``A=2`` trains on exactly the sequences of 2 processes with ``A=1``.
An epoch holds ``len(rows) // (A*W*B)`` optimizer steps; the incomplete tail is dropped and the next epoch starts
(a new permutation).  Iteration never ends: the engine stops after ``max_steps``.

Resuming
--------
``state_dict()`` is ``{"epoch", "position"}`` (``position`` = micro-batches this rank has taken in the epoch, the
same on every rank) plus the layout it was counted in.  After ``load_state_dict`` iteration continues with exactly
the batch the uninterrupted run would have produced next.  Resuming with another world size or micro-batch size is
allowed when the global batch stays the same (the position is converted through the number of sequences consumed).

The state counts batches *handed out*: iterate the sampler directly in the training process (or as a DataLoader
``batch_sampler`` with ``num_workers=0``), because worker prefetching would count batches not yet trained on.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from effitrain.registry import ConfigError


class ResumableBatchSampler:
    """Base class of the curricula: the batch layout, epochs and the resumable state.

    Subclasses decide the order of an epoch by overriding :meth:`epoch_order`; a curriculum whose batches depend on
    training progress (sequence-length warm-up, competence-based pacing) can override :meth:`batch_at` and read
    :attr:`micro_batches_seen`, and may set :attr:`hook` to an ``effitrain.engine.events.Hook`` that the engine
    registers (its state is checkpointed with the other hooks).
    """

    #: an engine hook this curriculum needs (e.g. to read the loss or pace on steps); None for static orders
    hook: Optional[Any] = None

    def __init__(self, num_rows: int, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
                 rank: int) -> None:
        if micro_batch_size < 1 or grad_accum < 1 or world_size < 1:
            raise ValueError("micro_batch_size, grad_accum and world_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = self.num_rows // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train: the packed training data has {self.num_rows} sequences, fewer than one global "
                              f"batch of {self.global_batch_size} (micro_batch_size x grad_accum x world size); "
                              f"lower the batch size or add data")
        #: micro-batches each rank takes per epoch
        self.micro_batches_per_epoch = self.steps_per_epoch * grad_accum
        self.epoch = 0
        self.position = 0
        self._cached_epoch: Optional[int] = None
        self._cached_order: Optional[np.ndarray] = None

    # -- what subclasses change -------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row indices of ``epoch`` in training order (at least ``steps_per_epoch * global_batch_size``)."""
        raise NotImplementedError

    def batch_at(self, epoch: int, position: int) -> list[int]:
        """This rank's rows for micro-batch ``position`` of ``epoch``: the layout of the module docstring."""
        order = self._order(epoch)
        start = (position * self.world_size + self.rank) * self.micro_batch_size
        return order[start:start + self.micro_batch_size].tolist()

    # -- iteration and state ----------------------------------------------------------------------------------

    @property
    def micro_batches_seen(self) -> int:
        """Micro-batches this rank has taken since the start of training, across epochs."""
        return self.epoch * self.micro_batches_per_epoch + self.position

    def _order(self, epoch: int) -> np.ndarray:
        # One epoch's order is kept: computing a permutation of millions of rows every micro-batch would not be free.
        if self._cached_epoch != epoch:
            order = np.asarray(self.epoch_order(epoch))
            if len(order) < self.steps_per_epoch * self.global_batch_size:
                raise ValueError(f"{type(self).__name__}.epoch_order({epoch}) returned {len(order)} rows, fewer than "
                                 f"the {self.steps_per_epoch * self.global_batch_size} an epoch needs")
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's next micro-batch (a list of row indices), forever, continuing from the current state."""
        while True:
            if self.position >= self.micro_batches_per_epoch:
                self.epoch += 1
                self.position = 0
            batch = self.batch_at(self.epoch, self.position)
            self.position += 1  # counted before the yield: state_dict() between batches is always up to date
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, position = self.epoch, self.position
        if position >= self.micro_batches_per_epoch:  # the epoch is finished: say where the next batch comes from
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "num_rows": self.num_rows,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; with another layout, through the number of sequences consumed in the epoch."""
        epoch, position = int(state["epoch"]), int(state["position"])
        rows = state.get("num_rows", self.num_rows)
        if rows != self.num_rows:
            raise ConfigError(f"resume: the checkpoint's sampler counted {rows} packed training sequences, this run "
                              f"has {self.num_rows}; the data changed (dataset, selection, tokenizer or seq_len)")
        old_per_micro = state.get("micro_batch_size", self.micro_batch_size) * state.get("world_size",
                                                                                          self.world_size)
        new_per_micro = self.micro_batch_size * self.world_size
        if old_per_micro != new_per_micro:
            old_global = old_per_micro * state.get("grad_accum", self.grad_accum)
            consumed = position * old_per_micro
            if old_global != self.global_batch_size or consumed % new_per_micro:
                raise ConfigError(f"resume: the checkpoint's global batch ({old_global} sequences) differs from this "
                                  f"run's ({self.global_batch_size}); resuming would not continue the same order")
            position = consumed // new_per_micro
        if position > self.micro_batches_per_epoch:
            raise ConfigError(f"resume: sampler position {position} is past the end of an epoch "
                              f"({self.micro_batches_per_epoch} micro-batches)")
        self.epoch, self.position = epoch, position

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rows={self.num_rows}, global_batch={self.global_batch_size}, "
                f"epoch={self.epoch}, position={self.position}/{self.micro_batches_per_epoch})")


class StepSlotSampler(ResumableBatchSampler):
    """Base of the curricula that compute each optimizer step's rows as a whole (mixture, paced difficulty, the
    step-stream samplers): there are no epochs, only steps.

    A subclass gives :meth:`slots`, the ``global_batch_size`` rows of optimizer step ``s`` in slot order (a function of
    the seed, the step and the subclass's own counters), and, if it keeps counters, :meth:`step_done` to move them
    past a finished step.  Rank ``r``'s micro-batch ``m`` of the step is slots ``[(m*W + r)*B, ... + B)``, the layout
    of every curriculum (module docstring).  The state is ``(step, micro)`` plus what the subclass adds; a resume with
    another micro-batch layout of the same global batch continues inside a step through the sequences consumed.
    """

    def __init__(self, num_rows: int, **layout: Any) -> None:
        super().__init__(num_rows, **layout)
        self.step = 0                       # the optimizer step whose rows are being handed out
        self.micro = 0                      # micro-batches of that step this rank has taken
        self._slots_step: Optional[int] = None
        self._slots = np.zeros(0, np.int64)

    # -- what subclasses change -------------------------------------------------------------------------------
    def slots(self, step: int) -> np.ndarray:
        """All ``global_batch_size`` rows of ``step`` in slot order; called once per step, in step order."""
        raise NotImplementedError

    def step_done(self) -> None:
        """Called once this rank has handed out the last micro-batch of :attr:`step` (already advanced)."""

    # -- iteration and state ----------------------------------------------------------------------------------
    @property
    def micro_batches_seen(self) -> int:
        return self.step * self.grad_accum + self.micro

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self._slots_step != self.step:
                self._slots, self._slots_step = self.slots(self.step), self.step
            start = (self.micro * self.world_size + self.rank) * self.micro_batch_size
            batch = self._slots[start:start + self.micro_batch_size].tolist()
            self.micro += 1  # counted before the yield: state_dict() between batches is always up to date
            if self.micro == self.grad_accum:
                self.step, self.micro = self.step + 1, 0
                self.step_done()
            yield batch

    def slot_state(self) -> dict[str, Any]:
        """The step, the micro-batch within it and the layout they were counted in (subclasses add their own)."""
        return {"step": self.step, "micro": self.micro, "num_rows": self.num_rows,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "world_size": self.world_size}

    def load_slot_state(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s step and micro-batch (converted to this run's layout; the global batch must be
        the same, or the steps would hold other rows)."""
        old_per_micro = state["micro_batch_size"] * state["world_size"]
        if old_per_micro * state["grad_accum"] != self.global_batch_size:
            raise ConfigError(f"resume: the checkpoint's global batch ({old_per_micro * state['grad_accum']} "
                              f"sequences) differs from this run's ({self.global_batch_size}); resuming would not "
                              f"continue the same batches")
        consumed = int(state["micro"]) * old_per_micro
        if consumed % (self.micro_batch_size * self.world_size):
            raise ConfigError("resume: the checkpoint stopped inside an optimizer step at a point this run's "
                              "micro-batch layout cannot continue from")
        self.step = int(state["step"])
        self.micro = consumed // (self.micro_batch_size * self.world_size)
        self._slots_step = None


class ShuffleSampler(ResumableBatchSampler):
    """A fresh uniform permutation every epoch, from ``numpy.random.default_rng([seed, epoch])``.

    Seeding by ``(seed, epoch)`` rather than by advancing one generator makes any epoch's order computable on its
    own, which is what lets a resumed run (or another rank) land on the same order without replaying.
    """

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed % 2**63, epoch]).permutation(self.num_rows)


class SequentialSampler(ResumableBatchSampler):
    """The packed order (domains in sorted order, documents in source order), the same every epoch."""

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.arange(self.num_rows)


def _layout(packed: Any, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
            rank: int) -> dict[str, Any]:
    return {"num_rows": len(packed), "seed": seed, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
            "world_size": world_size, "rank": rank}


def build_shuffle(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int, world_size: int,
                  rank: int) -> ShuffleSampler:
    """The ``curriculum: shuffle`` builder; ``packed`` is the packed train dataset (only its length is used)."""
    kw = _layout(packed, seed, micro_batch_size, grad_accum, world_size, rank)
    return ShuffleSampler(kw.pop("num_rows"), **kw)


def build_sequential(params: Any, packed: Any, *, seed: int, micro_batch_size: int, grad_accum: int,
                     world_size: int, rank: int) -> SequentialSampler:
    """The ``curriculum: sequential`` builder: rows in packed order, no shuffling."""
    kw = _layout(packed, seed, micro_batch_size, grad_accum, world_size, rank)
    return SequentialSampler(kw.pop("num_rows"), **kw)
