"""``objective: sami``: Self-Supervised Alignment with Mutual Information (Fränken et al., 2404.14313; the loss as
the authors' ``src/sami/trainers/sami_trainer.py`` computes it).

Per micro-batch of B prompts (rows of ``dataset.format: prompts``) and C constitutions (short written principles):

1. **Sampling.**  Each prompt is put after each constitution, given as a system message (the authors' prompt puts
   the constitution before the question), and answered once: C responses per prompt, response ``j`` written under
   constitution ``j``.  They are drawn by the repo's GRPO sampling path (:class:`~effitrain.objectives.grpo_sampling.
   PolicyGenerate`, one sample per prompt) from ``sample_from``: ``stage_start`` (the paper's iterations: the
   responses of an iteration come from the model it started from, a frozen copy here) or ``policy`` (the model
   being trained, on-policy).  Draws are seeded by (``seed``, micro-step, rank), so a resumed run samples the same.
2. **The C x C matrix.**  ``L[i, j] = mean_t log p(response_j[t] | constitution_i, prompt, response_j[<t])`` under
   the trained policy, the mean over the response's tokens (the authors' ``get_batch_logprobs``: length-normalised).
3. **The loss** (the authors' ``sami_loss``): row-wise cross-entropy of ``softmax_j L[i, :]`` towards ``j = i``
   (which response was written under this constitution) and column-wise of ``softmax_i L[:, j]`` towards ``i = j``
   (which constitution produced this response), averaged; a lower bound on the mutual information between
   constitutions and responses (InfoNCE) is ``log C - loss``.  Averaged over the B prompts.

The responses are constants: only the log-probabilities carry gradient, so the update raises ``L[i, i]`` against
the off-diagonal entries of its row and column.  The authors' matrix is built the same way (``prompt_c{i}_r{j}``:
constitution i's prompt with response j); their trainer takes one prompt per micro-batch, here B.

Difference kept on purpose: the response's EOS token is scored (the authors drop it with the prompt mask), because
here the end of a response is part of what a constitution asks ("the number only" is a number, then the end).

With the built-in constitutions (:data:`BUILTIN_CHECKS`) the share of sampled responses that follow their own
constitution is logged (``sami_follow``), and the share that contains the right number (``sami_correct``): the
mechanism is measurable on the built-in arithmetic.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from effitrain.config.blocks.objective_sami import DEFAULT_CONSTITUTIONS
from effitrain.objectives.grpo import completion_mask, left_pad, sampling_seed, split_prompts, token_logps
from effitrain.objectives.grpo_sampling import PolicyGenerate

NUMBER_ONLY, FULL_SENTENCE = DEFAULT_CONSTITUTIONS
#: the built-in constitutions and how a response is checked against each (the default ``constitutions``)
BUILTIN_CHECKS: dict[str, Callable[[str], bool]] = {
    NUMBER_ONLY: lambda text: re.fullmatch(r"-?\d+", text.strip()) is not None,
    # a sentence: starts with a capital letter, has at least three words, ends with a full stop
    FULL_SENTENCE: lambda text: re.fullmatch(r"[A-Z]\S*(\s+\S+){2,}\.", text.strip()) is not None,
}


def sami_loss(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, row loss, column loss)`` of ``[B, C, C]`` (or ``[C, C]``) log-probabilities, ``logprobs[b, i, j]``
    = log p(response j | constitution i, prompt b): the mean over prompts of ``(CE_rows + CE_columns) / 2``, each
    cross-entropy towards the diagonal and averaged over its C rows (columns)."""
    if logprobs.dim() == 2:
        logprobs = logprobs.unsqueeze(0)
    batch, c, _ = logprobs.shape
    labels = torch.arange(c, device=logprobs.device).repeat(batch)
    rows = F.cross_entropy(logprobs.reshape(batch * c, c), labels)                     # softmax over responses
    columns = F.cross_entropy(logprobs.transpose(1, 2).reshape(batch * c, c), labels)  # over constitutions
    return (rows + columns) / 2, rows, columns


def constitution_prefixes(tokenizer: Any, constitutions: Sequence[str]) -> list[list[int]]:
    """Each constitution as the token ids of a system message, tokenized as the chat rows tokenize a conversation's
    first message (one piece per message), so ``prefix + prompt`` is the prompt of the conversation [system, user]."""
    from effitrain.data.chat import encode_conversation

    return [encode_conversation(tokenizer, [{"role": "system", "content": c}])[0] for c in constitutions]


def response_logps(model: Any, ids: torch.Tensor, attention: torch.Tensor, prompt_width: int,
                   mask: torch.Tensor) -> torch.Tensor:
    """``[N]``: the mean log-probability of each row's response tokens (``mask`` 1 on them) after its left-padded
    prompt of ``prompt_width`` columns, at temperature 1 (the model's own distribution)."""
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
    logps = token_logps(logits[:, prompt_width - 1:-1], ids[:, prompt_width:], 1.0)
    mask = mask.to(logps.dtype)
    return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


class SAMI:
    def __init__(self, tokenizer: Any, constitutions: Sequence[str], *, max_new_tokens: int, temperature: float,
                 seed: int, sampler_model: Optional[Any] = None) -> None:
        self.tokenizer, self.constitutions, self.seed = tokenizer, list(constitutions), seed
        self.prefixes = constitution_prefixes(tokenizer, constitutions)
        self.checks = [BUILTIN_CHECKS.get(c) for c in constitutions]
        self.sampler_model = sampler_model  # None: the policy samples itself
        self.sampler = PolicyGenerate(tokenizer, group_size=1, max_new_tokens=max_new_tokens, temperature=temperature)

    def sample(self, model: Any, prompts: list[list[int]], state: Any, device: Any) -> dict[str, torch.Tensor]:
        """Prompt b under constitution i (row ``b * C + i``, left-padded) and its one sampled response (constants:
        drawn without gradient)."""
        conditioned = [prefix + prompt for prompt in prompts for prefix in self.prefixes]
        prompt_ids, prompt_mask = left_pad(conditioned, self.tokenizer.pad_token_id, device)
        sampler = self.sampler_model if self.sampler_model is not None else getattr(model, "module", model)
        responses = self.sampler.sample(sampler, prompt_ids, prompt_mask,
                                        sampling_seed(self.seed, state.micro_step, state.rank))
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "responses": responses,
                "mask": completion_mask(responses, self.tokenizer.eos_token_id)}

    def logprob_matrix(self, model: Any, s: dict[str, torch.Tensor], prompts: int) -> torch.Tensor:
        """``[B, C, C]``: entry (b, i, j) is the mean log-probability of response (b, j) after prompt b under
        constitution i; all B * C * C sequences in one forward."""
        c, device = len(self.constitutions), s["responses"].device
        b_idx = torch.arange(prompts, device=device).repeat_interleave(c * c)
        i_idx = torch.arange(c, device=device).repeat_interleave(c).repeat(prompts)
        j_idx = torch.arange(c, device=device).repeat(c * prompts)
        prompt_rows, response_rows = b_idx * c + i_idx, b_idx * c + j_idx
        ids = torch.cat([s["prompt_ids"][prompt_rows], s["responses"][response_rows]], dim=1)
        attention = torch.cat([s["prompt_mask"][prompt_rows], s["mask"][response_rows]], dim=1)
        logps = response_logps(model, ids, attention, s["prompt_ids"].shape[1], s["mask"][response_rows])
        return logps.view(prompts, c, c)

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tok, c = self.tokenizer, len(self.constitutions)
        device = batch["input_ids"].device
        prompts, answers = split_prompts(batch)
        s = self.sample(model, prompts, state, device)
        matrix = self.logprob_matrix(model, s, len(prompts))
        loss, rows, columns = sami_loss(matrix)

        diagonal = matrix.diagonal(dim1=1, dim2=2)
        off = (matrix.sum(dim=(1, 2)) - diagonal.sum(-1)) / max(c * c - c, 1)
        metrics = {"sami_row_loss": rows.detach(), "sami_column_loss": columns.detach(),
                   "sami_mi_bound": (torch.log(torch.tensor(float(c))) - loss).detach(),
                   "sami_diagonal_margin": (diagonal.mean(-1) - off).mean().detach(),
                   "sami_row_accuracy": (matrix.argmax(-1) == torch.arange(c, device=device)).float().mean(),
                   "response_tokens": s["mask"].sum(-1).float().mean()}
        texts = [tok.decode(row[:n], skip_special_tokens=True)
                 for row, n in zip(s["responses"].tolist(), s["mask"].sum(-1).tolist())]
        if all(check is not None for check in self.checks):
            follows = [self.checks[k % c](text) for k, text in enumerate(texts)]
            metrics["sami_follow"] = torch.tensor(sum(follows) / len(follows), device=device)
        # the reference answer's number ("82" or "The answer is 82."), found as a whole number in the response
        numbers = [(re.findall(r"-?\d+", tok.decode(a, skip_special_tokens=True)) or [None])[-1] for a in answers]
        correct = [numbers[k // c] is not None and numbers[k // c] in re.findall(r"-?\d+", text)
                   for k, text in enumerate(texts)]
        metrics["sami_correct"] = torch.tensor(sum(correct) / len(correct), device=device)
        return loss, metrics


def build(params: Any, *, model: Any, tokenizer: Any = None, device: Any = "cpu", bf16_supported: bool = False,
          **context: Any) -> SAMI:
    sampler_model = None
    if params.sample_from == "stage_start":
        from effitrain.objectives.preference import reference_model

        sampler_model = reference_model(None, model, torch.device(device), bf16_supported, tokenizer)
    return SAMI(tokenizer, params.constitutions, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, seed=params.seed, sampler_model=sampler_model)
