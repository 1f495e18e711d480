"""``objective: grpo``: Group Relative Policy Optimization with verifiable rewards (Shao et al., DeepSeekMath,
2402.03300, section 4.1; the loss as TRL's ``GRPOTrainer._compute_loss`` computes it).

Per micro-batch of B prompts (rows of ``dataset.format: prompts``: the tokens before the first label are the prompt,
the labelled ones the reference answer):

1. **Group sampling.**  Each prompt is answered ``G = group_size`` times by the ``generator`` backend
   (:mod:`effitrain.objectives.grpo_sampling`: ``transformers``, the default, the policy's own ``model.generate``;
   ``vllm``, a colocated engine given the policy's weights after every optimizer step): multinomial sampling from
   ``softmax(logits / temperature)``, every other logits processor off whatever the checkpoint's
   ``generation_config.json`` says (:mod:`effitrain.objectives.generation`), up to ``max_new_tokens``; a
   completion ends at its first EOS (included).  The draws are seeded by (``seed``, micro-step, rank) inside a
   forked RNG, so a resumed run samples the same completions and the global RNG stream of the run is untouched.
2. **Rewards.**  Each completion is decoded and scored by the reward blocks (:mod:`effitrain.objectives.rewards`);
   its reward is their weighted sum ``r``, or ``no_eos_reward`` when it has no EOS (Tülu 3's non-stop penalty).
3. **Group-normalised advantages.**  ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)`` (``scale_rewards:
   group``; ``batch`` divides by the micro-batch's std, ``none`` not at all, as Dr. GRPO); the std is the unbiased
   one, as TRL's.  Every token of a completion gets its completion's advantage (outcome supervision).
4. **Clipped surrogate with a KL penalty**, per completion token ``t``::

       ratio = exp(log pi(t) - log pi_old(t))
       loss_t = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL_t
       KL_t = exp(log ref(t) - log pi(t)) - (log ref(t) - log pi(t)) - 1      (the k3 estimator, always >= 0)

   reduced per ``loss_type``: ``grpo`` averages over each completion's tokens, then over completions (the paper's
   1/G sum 1/|o_i| sum_t); ``bnpo`` over all completion tokens of the micro-batch (verl's ``token-mean``);
   ``dr_grpo`` sums and divides by completions x max_new_tokens; ``dapo`` (TRL's default) sums and divides by the
   completion tokens of the micro-batch on all data-parallel ranks over the number of ranks, so after the ranks'
   gradients are averaged every token of the global micro-batch weighs the same.  TRL counts the tokens of the
   whole accumulated batch, which it samples before the first micro-step; here each micro-batch samples its own
   completions as it comes, so with ``grad_accum`` > 1 the count is the micro-batch's (exactly TRL's with one
   micro-batch per step).  ``entropy_coef`` subtracts that times the masked mean of the policy's per-token
   entropy (verl's entropy bonus).

``pi_old`` is the policy that sampled the completions.  With ``iterations: 1`` (TRL's default ``num_iterations``)
each sampled batch gets one optimizer step, so ``pi_old = pi`` when the loss is taken: the ratio is 1 and the clip
inactive, and the gradient is the policy gradient ``A * grad log pi``.  With ``iterations: mu > 1`` (DeepSeekMath's
mu, TRL's ``num_iterations``) the completions, advantages and ``log pi_old`` sampled at the first step of a cycle
are reused for the next ``mu - 1`` optimizer steps, in the same micro-batch order, and the ratio moves away from 1
and is clipped.  The data loader's rows at those steps are not used (a pass over the prompts takes mu times as many
steps).  The reused samples are per-rank state saved in each checkpoint (:meth:`GRPO.state_dict`), so a run stopped
mid-cycle resumes exactly; a rank without saved samples (a resume onto more ranks) starts a new cycle.

Log-probabilities are taken from ``logits / temperature`` (the distribution the samples were drawn from) at the
positions of the completion tokens, with ``position_ids`` counted from each prompt's first real token, so a
left-padded prompt is scored as it was sampled.

**Per-token weights.**  A method hook's ``batch["token_weights"]`` (a callable ``(completions, mask) -> [N, C]``) or
``decoupled_alpha`` (Thinkless's decoupled GRPO: :class:`effitrain.objectives.token_weights.DecoupledControl`) replaces
the ``loss_type`` reduction by ``sum_t w_t loss_t`` (:mod:`effitrain.objectives.token_weights`); without either the
loss is computed as above, unchanged.  Weights are kept with reused samples (``iterations`` > 1).

The reference model is owned by the objective, as ``dpo``'s (:func:`effitrain.objectives.preference.reference_model`):
the model at the start of the stage, or a saved folder; none is kept when ``beta`` is 0.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from effitrain.errors import RunFailed
from effitrain.objectives.common import COMPLETION_ADVANTAGES, COMPLETION_REWARDS, IGNORE_INDEX, TOKEN_WEIGHTS
from effitrain.objectives.grpo_sampling import PolicyGenerate, build_sampler, seeded  # noqa: F401 (seeded: API)
from effitrain.objectives.rewards import RewardFn
from effitrain.objectives.token_weights import DecoupledControl, checked, weighted_sum

STD_EPS = 1e-4  # TRL's and the paper's implementations add it to the group std


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """``[N * G]`` advantages of rewards laid out group after group (the G completions of a prompt together)."""
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards: {scale!r}")
    return centred / (std + STD_EPS)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float, epsilon_low: float, epsilon_high: float,
              loss_type: str = "grpo", max_new_tokens: Optional[int] = None, global_tokens: Optional[float] = None,
              world_size: int = 1, entropy: Optional[torch.Tensor] = None,
              entropy_coef: float = 0.0,
              token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The clipped GRPO loss of completion tokens (``[N, T]`` log-probabilities, ``mask`` 1 on completion tokens)
    and per-token statistics (the masked mean KL and the share of clipped tokens).

    ``dapo`` divides the summed token losses by ``global_tokens / world_size`` (TRL's ``num_items_in_batch /
    num_processes``): the data-parallel mean of the ranks' losses is then the sum over every rank's completion
    tokens divided by their total count, so each token weighs the same whichever rank or completion it is in.
    ``entropy`` (``[N, T]``, the policy's per-token entropy) with ``entropy_coef`` > 0 subtracts ``entropy_coef``
    times its masked token mean (verl's entropy bonus; TRL's ``entropy_coef``).  ``token_weights`` (``[N, T]``)
    replace the ``loss_type`` reduction: the loss is ``sum_t w_t loss_t`` over the completion tokens
    (:mod:`effitrain.objectives.token_weights`).  ``advantages`` may be per token (``[N, T]``) and ``beta`` a
    ``[N, T]`` tensor of per-token KL coefficients: a multi-turn rollout gives each turn's tokens that turn's
    advantage and KL weight (:mod:`effitrain.objectives.grpo_turns`)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if isinstance(beta, torch.Tensor) or beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if token_weights is not None:
        loss = weighted_sum(per_token, token_weights, mask)
    elif loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_new_tokens or per_token.shape[1]))
    elif loss_type == "dapo":
        counted = float(global_tokens) if global_tokens is not None else float(mask.sum())
        loss = (per_token * mask).sum() / (max(counted, 1.0) / world_size)
    else:
        raise ValueError(f"loss_type: {loss_type!r}")
    tokens = mask.sum().clamp(min=1.0)
    stats: dict[str, Any] = {}
    if entropy is not None:
        mean_entropy = (entropy * mask).sum() / tokens
        if entropy_coef:
            loss = loss - entropy_coef * mean_entropy
        stats["entropy"] = mean_entropy.detach()
    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    stats["clip_ratio"] = (is_clipped.to(mask.dtype) * mask).sum().detach() / tokens
    if kl is not None:
        stats["kl"] = (kl * mask).sum().detach() / tokens
    return loss, stats


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens`` (logits already aligned: row t scores token t)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The entropy of ``softmax(logits / temperature)`` at every position (the distribution the tokens were
    sampled from)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def global_token_count(mask: torch.Tensor, world_size: int) -> float:
    """Completion tokens of this micro-batch summed over the data-parallel ranks (one all-reduce)."""
    count = mask.sum().to(torch.float32)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return float(count)


def without_eos_replaced(rewards: torch.Tensor, completions: torch.Tensor, eos_id: int,
                         value: Optional[float]) -> torch.Tensor:
    """``rewards`` with the reward of every completion that has no EOS (cut at ``max_new_tokens``) replaced by
    ``value`` (open-instruct's ``non_stop_penalty``: Tülu 3's RLVR gives such an answer -10, right or wrong)."""
    if value is None:
        return rewards
    ended = (completions == eos_id).any(dim=1)
    return torch.where(ended, rewards, torch.full_like(rewards, value))


def split_prompts(batch: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt ids (before its first label) and reference answer ids (its labelled tokens)."""
    prompts, answers = [], []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(ids[:first])
        answers.append([label for label in labels if label != IGNORE_INDEX])
    return prompts, answers


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on every completion token up to and including the first EOS (all tokens when there is none)."""
    is_eos = completions == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1),
                        torch.full_like(is_eos[:, 0], completions.shape[1], dtype=torch.long))
    positions = torch.arange(completions.shape[1], device=completions.device).unsqueeze(0)
    return (positions <= first.unsqueeze(1)).long()


def sampling_seed(seed: int, micro_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0])


class GRPO:
    def __init__(self, tokenizer: Any, rewards: list[tuple[str, float, RewardFn]], reference: Optional[Any], *,
                 group_size: int, max_new_tokens: int, temperature: float, beta: float, epsilon: float,
                 epsilon_high: Optional[float], scale_rewards: str, loss_type: str, seed: int,
                 iterations: int = 1, grad_accum: int = 1, entropy_coef: float = 0.0,
                 no_eos_reward: Optional[float] = None, world_size: int = 1, sampler: Any = None,
                 token_weighting: Any = None) -> None:
        self.tokenizer, self.rewards, self.reference = tokenizer, rewards, reference
        self.group_size, self.max_new_tokens, self.temperature = group_size, max_new_tokens, temperature
        self.beta, self.epsilon_low = beta, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.scale_rewards, self.loss_type, self.seed = scale_rewards, loss_type, seed
        self.iterations, self.grad_accum = iterations, grad_accum
        self.entropy_coef, self.no_eos_reward, self.world_size = entropy_coef, no_eos_reward, world_size
        # micro-batch slot (micro-step mod grad_accum) -> what was sampled at the cycle's first step, for reuse
        self.samples: dict[int, dict[str, torch.Tensor]] = {}
        # where completions come from (objective.grpo.generator); the policy's own generate by default
        self.sampler = sampler if sampler is not None else PolicyGenerate(
            tokenizer, group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature)
        # the objective's own per-token weights (objective.grpo.decoupled_alpha: DeGRPO), a callable
        # (completions, mask) -> [N, C]; None keeps the loss_type's normalisation
        self.token_weighting = token_weighting

    def state_dict(self) -> Optional[dict]:
        if self.iterations == 1:
            return None
        return {slot: {k: v.cpu() for k, v in entry.items()} for slot, entry in self.samples.items()}

    def load_state_dict(self, state: dict) -> None:
        self.samples = {slot: dict(entry) for slot, entry in state.items()}

    # ------------------------------------------------------------------------------------------- sampling
    @property
    def hooks(self) -> tuple:
        """Engine hooks the sampler needs (a colocated vLLM engine: the weight push after each optimizer step)."""
        return tuple(self.sampler.hooks)

    def sample(self, module: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> torch.Tensor:
        """``[N * G, C]`` completion tokens, G per prompt, group after group (pad after the first EOS), drawn by
        the generator backend (:mod:`effitrain.objectives.grpo_sampling`)."""
        return self.sampler.sample(module, prompt_ids, prompt_mask, seed)

    def score(self, texts: list[str], references: list[str], lengths: list[int],
              device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the rewards ``[N * G]`` and each reward's mean."""
        total = torch.zeros(len(texts), device=device)
        means = {}
        self.last_reward_values = {}  # per completion, for batch[COMPLETION_REWARDS]
        for name, weight, fn in self.rewards:
            values = torch.tensor(fn(texts, references, lengths), dtype=torch.float32, device=device)
            total += weight * values
            means[f"reward_{name}"] = values.mean()
            self.last_reward_values[name] = values
        return total, means

    def logps(self, model: Any, ids: torch.Tensor, attention: torch.Tensor, prompt_width: int,
              with_entropy: bool = False) -> Any:
        """The completion tokens' log-probabilities (and, ``with_entropy``, the per-token entropies)."""
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
        completion_logits = logits[:, prompt_width - 1:-1]
        if not with_entropy:
            return token_logps(completion_logits, ids[:, prompt_width:], self.temperature)
        logp = torch.log_softmax(completion_logits.float() / self.temperature, dim=-1)   # one softmax for both
        return logp.gather(-1, ids[:, prompt_width:].unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def policy_logps(self, model: Any, ids: torch.Tensor, attention: torch.Tensor,
                     prompt_width: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The trained policy's log-probabilities, and its per-token entropies only when the entropy bonus needs
        them (the full-vocabulary entropy is a second pass over the logits)."""
        if self.entropy_coef:
            return self.logps(model, ids, attention, prompt_width, with_entropy=True)
        return self.logps(model, ids, attention, prompt_width), None

    def token_weights(self, batch: dict[str, Any], completions: torch.Tensor,
                      mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-token loss weights of this micro-batch's completions: a method hook's ``batch["token_weights"]``
        or the objective's own weighting (``decoupled_alpha``), called on the sampled completions; None (the
        ``loss_type``'s normalisation) when there are neither."""
        supplied = batch.get(TOKEN_WEIGHTS)
        if supplied is not None and self.token_weighting is not None:
            raise RunFailed(f"objective=grpo: a method set batch['{TOKEN_WEIGHTS}'] and objective.grpo.decoupled_alpha "
                            f"weighs the tokens too; use one of the two")
        weighting = supplied if supplied is not None else self.token_weighting
        if weighting is None:
            return None
        weights = weighting(completions, mask) if callable(weighting) else weighting
        return checked(weights, tuple(mask.shape), f"batch['{TOKEN_WEIGHTS}']" if supplied is not None
                       else "objective.grpo.decoupled_alpha", mask.device)

    def loss(self, logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
             advantages: torch.Tensor, mask: torch.Tensor, entropy: Optional[torch.Tensor],
             token_weights: Optional[torch.Tensor] = None, beta: Any = None) -> tuple[Any, dict]:
        global_tokens = global_token_count(mask, self.world_size) \
            if self.loss_type == "dapo" and token_weights is None else None
        return grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=self.beta if beta is None else beta,
                         epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                         max_new_tokens=self.max_new_tokens, global_tokens=global_tokens,
                         world_size=self.world_size, entropy=entropy, entropy_coef=self.entropy_coef,
                         token_weights=token_weights)

    # -------------------------------------------------------------------------------------------- the loss
    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        slot = state.micro_step % self.grad_accum
        if self.iterations > 1 and state.step % self.iterations and slot in self.samples:
            return self.reused(model, self.samples[slot], batch["input_ids"].device)
        tok = self.tokenizer
        device = batch["input_ids"].device
        prompts, answers = split_prompts(batch)
        references = [tok.decode(a, skip_special_tokens=True) for a in answers]
        prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id, device)
        module = getattr(model, "module", model)
        completions = self.sample(module, prompt_ids, prompt_mask,
                                  sampling_seed(self.seed, state.micro_step, state.rank))
        mask = completion_mask(completions, tok.eos_token_id)
        lengths = mask.sum(dim=1)
        texts = [tok.decode(row[:n], skip_special_tokens=True)
                 for row, n in zip(completions.tolist(), lengths.tolist())]
        rewards, reward_means = self.score(texts, [r for r in references for _ in range(self.group_size)],
                                           lengths.tolist(), device)
        rewards = without_eos_replaced(rewards, completions, tok.eos_token_id, self.no_eos_reward)
        advantages = group_advantages(rewards, self.group_size, self.scale_rewards)
        batch[COMPLETION_ADVANTAGES] = advantages.detach()  # for after_forward hooks (curriculum: dump)
        batch[COMPLETION_REWARDS] = dict(self.last_reward_values)  # which prompts were solved (mix_controller: relift)

        width = prompt_ids.shape[1]
        ids = torch.cat([prompt_ids.repeat_interleave(self.group_size, dim=0), completions], dim=1)
        attention = torch.cat([prompt_mask.repeat_interleave(self.group_size, dim=0), mask], dim=1)
        logps, entropy = self.policy_logps(model, ids, attention, width)
        ref_logps = None
        if self.beta != 0.0:
            with torch.no_grad():
                ref_logps = self.logps(self.reference, ids, attention, width)
        weights = self.token_weights(batch, completions, mask)
        loss, stats = self.loss(logps, logps.detach(), ref_logps, advantages, mask, entropy, weights)
        group_std = rewards.view(-1, self.group_size).std(dim=1).mean()
        metrics = {"reward": rewards.mean(), "reward_std": group_std, **reward_means,
                   "completion_tokens": lengths.float().mean()}
        if self.iterations > 1:  # kept for the cycle's next mu - 1 steps (and saved with a checkpoint)
            self.samples[slot] = {"ids": ids, "attention": attention, "mask": mask, "advantages": advantages,
                                  "old_logps": logps.detach(), "width": torch.tensor(width),
                                  **({"ref_logps": ref_logps} if ref_logps is not None else {}),
                                  **({"token_weights": weights} if weights is not None else {}),
                                  **{f"metric.{k}": v.detach() for k, v in metrics.items()}}
        return loss, {**metrics, **stats}

    def reused(self, model: Any, entry: dict[str, torch.Tensor], device: Any) -> tuple[torch.Tensor, dict]:
        """The loss on the samples of the cycle's first step, against the log-probabilities they were drawn with."""
        e = {k: v.to(device) for k, v in entry.items()}
        logps, entropy = self.policy_logps(model, e["ids"], e["attention"], int(e["width"]))
        loss, stats = self.loss(logps, e["old_logps"], e.get("ref_logps"), e["advantages"], e["mask"], entropy,
                                e.get("token_weights"), beta=e.get("beta"))
        metrics = {k.removeprefix("metric."): v for k, v in e.items() if k.startswith("metric.")}
        return loss, {**metrics, **stats}


def build(params: Any, *, model: Any, tokenizer: Any = None, device: Any = "cpu", bf16_supported: bool = False,
          grad_accum: int = 1, world_size: int = 1, **context: Any) -> GRPO:
    from effitrain.objectives.preference import reference_model
    from effitrain.objectives.rewards import build_rewards

    reference = None
    if params.beta != 0.0 or any(getattr(params, "turn_betas", None) or ()):
        reference = reference_model(params.reference, model, torch.device(device), bf16_supported, tokenizer)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0
    sampler = build_sampler(getattr(params, "generator_block", None), tokenizer, group_size=params.group_size,
                            max_new_tokens=params.max_new_tokens, temperature=params.temperature, rank=rank,
                            world_size=world_size)
    return GRPO(tokenizer, build_rewards(params.reward_blocks), reference, group_size=params.group_size,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature, beta=params.beta,
                epsilon=params.epsilon, epsilon_high=params.epsilon_high, scale_rewards=params.scale_rewards,
                loss_type=params.loss_type, seed=params.seed, iterations=params.iterations,
                grad_accum=grad_accum, entropy_coef=params.entropy_coef, no_eos_reward=params.no_eos_reward,
                world_size=world_size, sampler=sampler, token_weighting=decoupled_weighting(params))


def decoupled_weighting(params: Any) -> Optional[DecoupledControl]:
    """DeGRPO's weights when ``objective.grpo.decoupled_alpha`` is set (the first completion token is the control
    token), else None."""
    alpha = getattr(params, "decoupled_alpha", None)
    if alpha is None:
        return None
    return DecoupledControl(alpha, getattr(params, "decoupled_response", "sequence"))
