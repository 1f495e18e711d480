"""GRPO over conversations of several turns (``objective.grpo.turns`` > 1): the policy answers, the environment
block answers back (:mod:`effitrain.generation.environments`), the policy answers again, and so on; the loss is on
the policy's tokens only.  SCoRe (Kumar et al., "Training Language Models to Self-Correct via Reinforcement
Learning", 2409.12917) is this with two turns, a scripted user and the reward settings of its two stages.

Per micro-batch of B prompts, with ``G = group_size`` and ``T = turns``:

1. **Turn 1** is GRPO's own group sampling (the same draws as a single-turn run with the same seed): G answers per
   prompt.  Each of the ``B x G`` conversations then goes on alone: the environment's reply to its last answer is
   appended (rendered by the chat template as a user message and the assistant header,
   :func:`effitrain.data.chat.follow_up_ids`), and the policy samples one answer to the whole conversation so far
   (``model.generate`` on the left-padded conversations, seeded by (seed, micro-step, rank, turn)).
2. **Rewards per turn.**  Every turn's answer is scored by the reward blocks, ``r_t`` (and ``no_eos_reward`` for an
   answer cut without EOS).  The reward a turn is trained on is :func:`shaped_rewards`::

       s_1 = w_1 * r_1,      s_t = w_t * r_t + alpha * (r_t - r_(t-1))     (t > 1)

   ``w`` = ``turn_reward_weights``, ``alpha`` = ``progress_bonus`` (SCoRe's stage II bonus, eq. 5, which pays for
   turning a wrong answer right and charges for turning a right one wrong).  Each turn's shaped rewards are
   group-normalised over the G conversations of a prompt, as GRPO's are.
3. **Credit per turn.**  Each turn's tokens get that turn's advantage and that turn's KL coefficient
   (``turn_betas``): SCoRe's "instantaneous reward" policy gradient (no return carried from a later turn back to an
   earlier one).  The environment's tokens and the padding get neither: their loss mask is 0 (they are context, not
   actions).  The loss is GRPO's (:func:`effitrain.objectives.grpo.grpo_loss`) on that mask.

The sequence a loss is taken on is the prompt (left-padded to the micro-batch's widest, as single-turn GRPO lays it
out) followed by the conversation's rest packed without holes: answer 1 (to its EOS), the environment's message,
answer 2, ..., then padding.  So the log-probabilities of an answer are taken in exactly the context it was
sampled in.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from effitrain.data import chat
from effitrain.errors import RunFailed
from effitrain.objectives.common import COMPLETION_ADVANTAGES, TOKEN_WEIGHTS
from effitrain.objectives.grpo import (GRPO, build as build_single_turn, completion_mask, group_advantages, left_pad,
                                       sampling_seed, split_prompts, without_eos_replaced)
from effitrain.objectives.grpo_sampling import PolicyGenerate

ENV = -1  # the turn index of a token the environment wrote (and of padding): no loss, no advantage


def shaped_rewards(rewards: torch.Tensor, weights: Sequence[float], bonus: float) -> torch.Tensor:
    """``[T, M]`` rewards trained on from the ``[T, M]`` raw rewards of each turn: ``w_t * r_t`` plus, after the
    first turn, ``bonus * (r_t - r_(t-1))`` (SCoRe's progress bonus, alpha)."""
    out = rewards * torch.tensor(list(weights), dtype=rewards.dtype, device=rewards.device).unsqueeze(1)
    if bonus:
        out[1:] = out[1:] + bonus * (rewards[1:] - rewards[:-1])
    return out


def turn_seed(seed: int, micro_step: int, rank: int, turn: int) -> int:
    """The sampling seed of turn ``turn`` > 1 (turn 1 draws with GRPO's own seed)."""
    return int(np.random.SeedSequence([seed, micro_step, rank, turn]).generate_state(1)[0])


def conversation_tokens(segments: Sequence[Sequence[tuple[Sequence[int], int]]], pad_id: int,
                        device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention, turn_of)`` ``[M, L]`` of each conversation's segments after its prompt (``(tokens,
    turn)``: a policy turn 0..T-1, or :data:`ENV` for the environment's), one after another, right-padded."""
    rows = [[t for tokens, _ in segs for t in tokens] for segs in segments]
    turns = [[turn for tokens, turn in segs for _ in tokens] for segs in segments]
    width = max(max((len(r) for r in rows), default=0), 1)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    turn_of = torch.tensor([t + [ENV] * (width - len(t)) for t in turns], dtype=torch.long, device=device)
    return ids, attention, turn_of


def per_token(values: torch.Tensor, turn_of: torch.Tensor) -> torch.Tensor:
    """``[M, L]``: each policy token's value of its turn (``values`` ``[T, M]``), 0 on the environment's tokens
    and the padding."""
    picked = values.t().gather(1, turn_of.clamp(min=0))
    return torch.where(turn_of >= 0, picked, torch.zeros_like(picked))


class MultiTurnGRPO(GRPO):
    """A built :class:`GRPO` whose rollouts are conversations of ``turns`` policy turns."""

    def __init__(self, single: GRPO, environment: Any, *, turns: int, reward_weights: Optional[Sequence[float]],
                 betas: Optional[Sequence[float]], progress_bonus: float) -> None:
        self.__dict__.update(single.__dict__)  # every setting of the built single-turn objective, as built
        self.environment, self.turns = environment, turns
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * turns
        self.turn_betas = list(betas) if betas is not None else [self.beta] * turns
        self.progress_bonus = progress_bonus
        if not any(self.turn_betas):
            self.beta = 0.0  # no KL on any turn (a reused batch then adds none either)
        # a later turn continues each conversation alone: one answer per conversation
        self.follow_up = PolicyGenerate(self.tokenizer, group_size=1, max_new_tokens=self.max_new_tokens,
                                        temperature=self.temperature)
        self._messages: dict[str, list[int]] = {}

    def message_ids(self, text: str) -> list[int]:
        if text not in self._messages:
            self._messages[text] = chat.follow_up_ids(self.tokenizer, text)
        return self._messages[text]

    def is_right(self, texts: list[str], references: list[str], lengths: list[int]) -> Optional[torch.Tensor]:
        """Which answers the ``exact_answer`` reward counts right (None without that reward): for the per-turn
        accuracy and the wrong->right / right->wrong shares."""
        for name, _, fn in self.rewards:
            if name == "exact_answer":
                return torch.tensor([v > 0 for v in fn(texts, references, lengths)])
        return None

    def rollout(self, module: Any, prompts: list[list[int]], references: list[str], device: Any,
                micro_step: int, rank: int) -> dict[str, Any]:
        """Sample the conversations; their policy turns' raw rewards ``[T, M]`` and token layout."""
        tok = self.tokenizer
        g = self.group_size
        prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id, device)
        refs = [r for r in references for _ in range(g)]
        contexts = [list(prompts[j // g]) for j in range(len(prompts) * g)]
        segments: list[list[tuple[list[int], int]]] = [[] for _ in contexts]
        rewards, metrics, right, lengths_all = [], {}, [], []
        for turn in range(self.turns):
            if turn == 0:
                completions = self.sample(module, prompt_ids, prompt_mask,
                                          sampling_seed(self.seed, micro_step, rank))
            else:
                ctx_ids, ctx_mask = left_pad(contexts, tok.pad_token_id, device)
                completions = self.follow_up.sample(module, ctx_ids, ctx_mask,
                                                    turn_seed(self.seed, micro_step, rank, turn + 1))
            lengths = completion_mask(completions, tok.eos_token_id).sum(dim=1).tolist()
            answers = [row[:n] for row, n in zip(completions.tolist(), lengths)]
            texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
            total, means = self.score(texts, refs, lengths, device)
            rewards.append(without_eos_replaced(total, completions, tok.eos_token_id, self.no_eos_reward))
            metrics.update({f"{k}_t{turn + 1}": v for k, v in means.items()})
            right.append(self.is_right(texts, refs, lengths))
            lengths_all.append(lengths)
            last = turn == self.turns - 1
            for j, answer in enumerate(answers):
                segments[j].append((answer, turn))
                if not last:
                    reply = self.message_ids(self.environment.reply(texts[j], refs[j], turn + 1))
                    segments[j].append((reply, ENV))
                    contexts[j] += answer + reply
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "segments": segments,
                "rewards": torch.stack(rewards), "metrics": metrics, "right": right,
                "tokens": torch.tensor(lengths_all, dtype=torch.float32).sum(0).mean()}

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        slot = state.micro_step % self.grad_accum
        if self.iterations > 1 and state.step % self.iterations and slot in self.samples:
            return self.reused(model, self.samples[slot], batch["input_ids"].device)
        if batch.get(TOKEN_WEIGHTS) is not None:
            # per-token weights address one answer's tokens; silently dropping them would train another objective
            raise RunFailed(f"objective=grpo with turns={self.turns}: a method set batch['{TOKEN_WEIGHTS}'], which "
                            f"multi-turn rollouts do not read; use turns=1 or drop the method that weighs tokens")
        tok = self.tokenizer
        device = batch["input_ids"].device
        prompts, answers = split_prompts(batch)
        references = [tok.decode(a, skip_special_tokens=True) for a in answers]
        module = getattr(model, "module", model)
        roll = self.rollout(module, prompts, references, device, state.micro_step, state.rank)

        raw = roll["rewards"]                                            # [T, M]
        shaped = shaped_rewards(raw, self.reward_weights, self.progress_bonus)
        advantages = torch.stack([group_advantages(s, self.group_size, self.scale_rewards) for s in shaped])
        batch[COMPLETION_ADVANTAGES] = advantages[-1].detach()           # the final answers' (curriculum: dump)

        rest, rest_attention, turn_of = conversation_tokens(roll["segments"], tok.pad_token_id, device)
        width = roll["prompt_ids"].shape[1]
        ids = torch.cat([roll["prompt_ids"].repeat_interleave(self.group_size, dim=0), rest], dim=1)
        attention = torch.cat([roll["prompt_mask"].repeat_interleave(self.group_size, dim=0), rest_attention], dim=1)
        mask = (turn_of >= 0).long()
        token_advantages = per_token(advantages, turn_of)
        kl_on = any(self.turn_betas)
        beta = per_token(torch.tensor(self.turn_betas, device=device).unsqueeze(1).expand(-1, len(turn_of)),
                         turn_of) if kl_on else 0.0
        logps, entropy = self.policy_logps(model, ids, attention, width)
        ref_logps = None
        if kl_on:
            with torch.no_grad():
                ref_logps = self.logps(self.reference, ids, attention, width)
        loss, stats = self.loss(logps, logps.detach(), ref_logps, token_advantages, mask, entropy, beta=beta)
        metrics = {"reward": raw[-1].mean(), "reward_std": raw[-1].view(-1, self.group_size).std(dim=1).mean(),
                   "completion_tokens": roll["tokens"].to(device), **roll["metrics"]}
        for t in range(self.turns):
            metrics[f"reward_t{t + 1}"] = raw[t].mean()
        if roll["right"][0] is not None:
            first, final = roll["right"][0], roll["right"][-1]
            for t, r in enumerate(roll["right"]):
                metrics[f"accuracy_t{t + 1}"] = r.float().mean().to(device)
            metrics["wrong_to_right"] = (~first & final).float().mean().to(device)
            metrics["right_to_wrong"] = (first & ~final).float().mean().to(device)
        if self.iterations > 1:  # kept for the cycle's next mu - 1 steps (and saved with a checkpoint)
            self.samples[slot] = {"ids": ids, "attention": attention, "mask": mask, "advantages": token_advantages,
                                  "old_logps": logps.detach(), "width": torch.tensor(width),
                                  **({"ref_logps": ref_logps, "beta": beta} if kl_on else {}),
                                  **{f"metric.{k}": v.detach() for k, v in metrics.items()}}
        return loss, {**metrics, **stats}


def build(params: Any, **context: Any) -> GRPO:
    """``objective: grpo``: the single-turn objective, or with ``turns`` > 1 its multi-turn rollouts."""
    single = build_single_turn(params, **context)
    if getattr(params, "turns", 1) == 1:
        return single
    return MultiTurnGRPO(single, params.environment_block.build(), turns=params.turns,
                         reward_weights=params.turn_reward_weights, betas=params.turn_betas,
                         progress_bonus=params.progress_bonus)
