"""Controllers of ``objective: mixed``: they override the weights of the components they govern, per step, from
what the run measures.  The contract (called by :class:`effitrain.objectives.mixed.Mixed`):

* ``weights(state) -> {component: weight}`` once per optimizer step, at its first micro-batch;
* ``observe(component, batch, state)`` after each component's forward (the batch holds what the objective
  published: ``completion_rewards`` of a grpo component);
* ``buffer_batch(component, state, device)``: the rows of a ``data: buffer`` component;
* optional ``after_backward(state, grad_accum)`` / ``step_end(state, weights)``: engine events;
* ``metrics(device)``, ``state_dict()`` / ``load_state_dict()`` (saved in each rank's checkpoint file).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from effitrain.objectives.common import COMPLETION_REWARDS, IGNORE_INDEX


def demonstration_row(prompt: list[int], answer: list[int], seq_len: int, pad_id: int) -> np.ndarray:
    """A chat row ``[3, seq_len]`` (input ids, labels, position ids) of a prompt and its reference answer, the loss
    on the answer's tokens only (as :mod:`effitrain.data.chat` labels an assistant message)."""
    ids = (prompt + answer)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:seq_len]
    pad = seq_len - len(ids)
    return np.array([ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, list(range(len(ids))) + [0] * pad],
                    dtype=np.int64)


class ReLIFT:
    """ReLIFT (Ma et al., 2506.07527; the authors' ``verl/relift/trainer.py``): after every GRPO forward, the prompts
    whose ``G`` samples all fail (``reward`` <= 0 for every one) join the buffer with their reference answer, newest
    first.  When the buffer holds one step's rows, the next step is an SFT step on the newest of them; the rest stay
    for the next one."""

    def __init__(self, params: Any, *, tokenizer: Any, micro_batch_size: int, grad_accum: int) -> None:
        self.rl, self.sft, self.reward = params.rl, params.sft, params.reward
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
        self.micro_batch_size, self.rows_per_step = micro_batch_size, micro_batch_size * grad_accum
        self.buffer: list[tuple[list[int], list[int]]] = []  # (prompt ids, reference answer ids), newest first
        self.training: list[tuple[list[int], list[int]]] = []  # what this SFT step trains on
        self.sft_steps = 0
        self.collected = 0
        self.seq_len = 0

    def weights(self, state: Any) -> dict[str, float]:
        if len(self.buffer) >= self.rows_per_step:
            self.training, self.buffer = self.buffer[:self.rows_per_step], self.buffer[self.rows_per_step:]
            self.sft_steps += 1
            return {self.rl: 0.0, self.sft: 1.0}
        self.training = []
        return {self.rl: 1.0, self.sft: 0.0}

    def observe(self, component: str, batch: dict[str, Any], state: Any) -> None:
        if component != self.rl or COMPLETION_REWARDS not in batch:  # grpo reusing a cycle's samples: nothing new
            return
        values = batch[COMPLETION_REWARDS][self.reward]
        from effitrain.objectives.grpo import split_prompts

        prompts, answers = split_prompts(batch)
        self.seq_len = batch["input_ids"].shape[1]
        unsolved = (values.view(len(prompts), -1) <= 0).all(dim=1).tolist()
        failed = [(p, a) for p, a, bad in zip(prompts, answers, unsolved) if bad]
        self.buffer = failed + self.buffer   # the authors concatenate [this batch's, the older ones]
        self.collected += len(failed)

    def buffer_batch(self, component: str, state: Any, device: Any) -> dict[str, Any]:
        from effitrain.objectives.mixed import rows_to_batch

        k = state.micro_step % (self.rows_per_step // self.micro_batch_size)
        part = self.training[k * self.micro_batch_size:(k + 1) * self.micro_batch_size]
        rows = np.stack([demonstration_row(p, a, self.seq_len, self.pad_id) for p, a in part])
        return rows_to_batch(torch.from_numpy(rows).to(device))

    def metrics(self, device: Any) -> dict[str, torch.Tensor]:
        return {"relift/buffer": torch.tensor(float(len(self.buffer)), device=device),
                "relift/sft_steps": torch.tensor(float(self.sft_steps), device=device),
                "relift/collected": torch.tensor(float(self.collected), device=device)}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "training": self.training, "sft_steps": self.sft_steps,
                "collected": self.collected, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [(list(p), list(a)) for p, a in state["buffer"]]
        self.training = [(list(p), list(a)) for p, a in state["training"]]
        self.sft_steps, self.collected, self.seq_len = state["sft_steps"], state["collected"], state["seq_len"]


class SASR:
    """SASR (Chen et al., 2505.13026): ``warmup_steps`` of SFT; ``G_warmup`` is the SFT gradient norm of the last of
    them.  Then each step is an SFT step with probability ``p = G_last / (G_last + gamma G_warmup)`` (``G_last``: the
    gradient norm of the latest SFT step; a large SFT gradient says the policy has drifted from the demonstrations'
    distribution, so SFT is drawn more), else a GRPO step.  The draw is seeded by (seed, step): a resumed run draws
    the same."""

    def __init__(self, params: Any, *, seed: int) -> None:
        self.sft, self.rl = params.sft, params.rl
        self.warmup_steps, self.gamma, self.seed = params.warmup_steps, params.gamma, seed
        self.g_warmup: Optional[float] = None
        self.g_last: Optional[float] = None
        self.p = 1.0
        self._norm: Optional[float] = None

    def probability(self) -> float:
        """p of the next step from the norms seen so far (1 during the warm-up)."""
        if self.g_warmup is None or self.g_last is None:
            return 1.0
        return self.g_last / (self.g_last + self.gamma * self.g_warmup)

    def choose(self, step: int) -> bool:
        """Whether ``step`` is an SFT step."""
        if step < self.warmup_steps:
            self.p = 1.0
            return True
        self.p = self.probability()
        return float(np.random.default_rng([self.seed, step]).random()) < self.p

    def weights(self, state: Any) -> dict[str, float]:
        sft = self.choose(state.step)
        return {self.sft: 1.0 if sft else 0.0, self.rl: 0.0 if sft else 1.0}

    def record(self, step: int, sft_grad_norm: float) -> None:
        """The gradient norm of SFT step ``step``: ``G_warmup`` at the warm-up's last step, ``G_last`` always."""
        if step == self.warmup_steps - 1:
            self.g_warmup = sft_grad_norm
        self.g_last = sft_grad_norm

    def observe(self, component: str, batch: dict[str, Any], state: Any) -> None:
        pass

    def after_backward(self, state: Any, grad_accum: int) -> None:
        """The norm of the accumulated gradient, read before the optimizer step clips it (no ZeRO-2 partitions)."""
        if (state.micro_step + 1) % grad_accum:
            return
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        self._norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())) \
            if grads else None

    def step_end(self, state: Any, weights: dict[str, float]) -> None:
        if weights.get(self.sft, 0.0) > 0:
            norm = self._norm
            if norm is None:  # ZeRO-2 partitions the gradients: DeepSpeed's own global norm
                engine_norm = state.engine.get_global_grad_norm()
                norm = None if engine_norm is None else float(engine_norm)
            if norm is not None:
                self.record(state.step - 1, norm)   # state.step already counts the step that ended
        self._norm = None

    def metrics(self, device: Any) -> dict[str, torch.Tensor]:
        return {"sasr/p": torch.tensor(self.p, device=device),
                "sasr/g_last": torch.tensor(self.g_last or 0.0, device=device)}

    def state_dict(self) -> dict:
        return {"g_warmup": self.g_warmup, "g_last": self.g_last, "p": self.p}

    def load_state_dict(self, state: dict) -> None:
        self.g_warmup, self.g_last, self.p = state["g_warmup"], state["g_last"], state["p"]


def build_relift(params: Any, *, tokenizer: Any = None, micro_batch_size: int = 1, grad_accum: int = 1,
                 **context: Any) -> ReLIFT:
    return ReLIFT(params, tokenizer=tokenizer, micro_batch_size=micro_batch_size, grad_accum=grad_accum)


def build_sasr(params: Any, *, seed: int = 0, **context: Any) -> SASR:
    return SASR(params, seed=seed)
