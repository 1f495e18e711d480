"""Preference objectives on (chosen, rejected) pairs: ``dpo`` (with a frozen reference model) and ``simpo``
(reference-free).

A micro-batch of B preference rows arrives as ``2B`` sequences, the B chosen first and then the B rejected (see
:func:`effitrain.data.chat.to_batch`); one forward of the trained model scores both halves, as TRL's DPOTrainer does.
The log-probability of a response, ``log pi(y|x)``, is the sum of the next-token log-probabilities over its labelled
(assistant) tokens; ``length_normalized`` divides it by the number of those tokens.

DPO (Rafailov et al., 2305.18290, eq. 7)::

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

averaged over the pairs; the paper's beta is 0.1.  Tülu 3 (2411.15124, section 5) trains with *length-normalized*
DPO (both log-probabilities divided by the response length) and beta = 5.  The implicit rewards
``beta * (log pi - log ref)`` of both responses, their margin and how often the chosen one wins are logged, as TRL
logs them.

SimPO (Meng, Xia & Chen, 2405.14734; the authors' ``simpo_trainer.py``)::

    loss = -log sigmoid( beta * (avg log pi(y_w|x) - avg log pi(y_l|x)) - gamma )

with averages over the response tokens and no reference; the authors write gamma as ``gamma_beta_ratio * beta``
(their Llama-3-8B-base config: beta = 2.0, gamma_beta_ratio = 0.5).

The reference model of ``dpo`` is owned by the objective (frozen, eval mode, never in the optimizer or in the
checkpoints): by default a copy of the trained model as it is when the objective is built, i.e. the model at the
start of the stage (a resumed run builds the same start model again before loading its checkpoint, so the
reference is the same); or the model saved at ``reference`` (a folder, or '@stage:NAME' in a pipeline).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from effitrain.objectives.common import model_inputs, token_losses
from effitrain.registry import ConfigError


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, length_normalized: bool) -> torch.Tensor:
    """``[N]``: each sequence's summed (or averaged) next-token log-probability over its labelled positions."""
    losses, mask = token_losses(logits, labels)
    total = -(losses * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if length_normalized else total


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean loss, chosen rewards [B], rejected rewards [B])`` of DPO's sigmoid loss."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean(), chosen_rewards, rejected_rewards


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma).mean()


def _halves(batch: dict[str, Any]) -> int:
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"a preference batch holds chosen and rejected rows in two halves; got {n} rows")
    return n // 2


def _metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"reward_chosen": chosen_rewards.detach().mean(), "reward_rejected": rejected_rewards.detach().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).detach().mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().detach().mean()}


class DPO:
    def __init__(self, reference: torch.nn.Module, *, beta: float, length_normalized: bool) -> None:
        self.reference = reference
        self.beta = beta
        self.length_normalized = length_normalized

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = _halves(batch)
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        logps = sequence_logps(model(**inputs).logits, batch["labels"], self.length_normalized)
        with torch.no_grad():
            ref = sequence_logps(self.reference(**inputs).logits, batch["labels"], self.length_normalized)
        loss, chosen_rewards, rejected_rewards = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.beta)
        return loss, _metrics(chosen_rewards, rejected_rewards)


class SimPO:
    def __init__(self, *, beta: float, gamma_beta_ratio: float) -> None:
        self.beta = beta
        self.gamma = gamma_beta_ratio * beta

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = _halves(batch)
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        avg = sequence_logps(model(**inputs).logits, batch["labels"], length_normalized=True)
        loss = simpo_loss(avg[:b], avg[b:], self.beta, self.gamma)
        return loss, _metrics(self.beta * avg[:b], self.beta * avg[b:])


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()  # dropout off: the reference scores are a fixed function of the pair
    model.requires_grad_(False)
    return model


def reference_model(folder: Optional[str], model: Any, device: torch.device, bf16_supported: bool,
                    tokenizer: Any = None) -> torch.nn.Module:
    """The frozen reference of a KL-regularised objective (dpo, grpo): a copy of ``model`` as it is now, i.e. at the
    start of the stage, when ``folder`` is None; else the model saved there, which must score the policy's token ids
    (the same vocabulary and, where its tokenizer is saved with it, the same tokenizer)."""
    if folder is None:
        reference = copy.deepcopy(model)  # the model at the start of the stage, before any update
    else:
        from transformers import AutoModelForCausalLM

        from effitrain.config.inputs import check_model_folder
        from effitrain.objectives.distill import check_same_tokenizer, teacher_dtype, vocab_rows

        check_model_folder("objective.reference", folder, revision=None, need_tokenizer=False)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=teacher_dtype("auto", device, bf16_supported))
        ours, theirs = vocab_rows(model), vocab_rows(reference)
        if ours != theirs:
            # the log-probability ratios compare the two models on the policy's ids: another vocabulary either
            # fails on an id past its end or, when larger, normalises over tokens the policy does not have
            raise ConfigError(f"objective.reference: the model at {folder} has a vocabulary of {theirs} tokens, "
                              f"the policy {ours}; the reference must share the policy's tokenizer (null: a frozen "
                              f"copy of the policy at the start)")
        check_same_tokenizer(folder, tokenizer, key="objective.reference")
    return frozen(reference.to(device))


def build_dpo(params: Any, *, model: Any, device: Any = "cpu", bf16_supported: bool = False, tokenizer: Any = None,
              **context: Any) -> DPO:
    reference = reference_model(params.reference, model, torch.device(device), bf16_supported, tokenizer)
    return DPO(reference, beta=params.beta, length_normalized=params.length_normalized)


def build_simpo(params: Any, **context: Any) -> SimPO:
    return SimPO(beta=params.beta, gamma_beta_ratio=params.gamma_beta_ratio)
