"""``objective: distill``: logit distillation from a frozen teacher (Hinton, Vinyals & Dean, 1503.02531).

    loss = alpha * soft + (1 - alpha) * hard
    soft = T^2 * mean over labelled positions of KL( softmax(t / T) || softmax(s / T) )   (summed over the vocabulary)
    hard = the student's own next-token cross-entropy (exactly ``causal_lm``)

Conventions, checked against torchdistill's ``KDLoss`` (``losses/mid_level.py``; ``single.py`` in older versions): the
KL is ``kl_div(log_softmax(s/T), softmax(t/T))`` summed over classes and averaged over the rows (``batchmean``; our
rows are token positions), multiplied by T^2 so that the soft term's gradients keep their size as T changes (Hinton,
section 2). torchdistill's ``alpha`` weighs the *hard* loss; ours weighs the *soft* loss (the issue's convention), so
torchdistill's ``alpha = a`` is our ``alpha = 1 - a``. The soft loss is taken at the same positions as the hard loss
(position t predicts token t+1; labels of -100 excluded).

``loss: mse_logits`` replaces the soft term with the mean squared error between the raw logits (Ba & Caruana 2014,
torchdistill's logit-matching option), averaged over positions and vocabulary; the temperature is not used.

The teacher is loaded once (``AutoModelForCausalLM.from_pretrained``), put on the run's device, in bfloat16 on a GPU
that supports it, in eval mode with ``requires_grad=False``, and run under ``torch.no_grad``.  It is not part of the
DeepSpeed engine: every rank holds a full copy (also under ZeRO-3), and it is not checkpointed (a resumed run loads it
again from its path).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from effitrain.objectives.common import IGNORE_INDEX, model_inputs
from effitrain.registry import ConfigError


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the vocabulary, averaged over the ``mask`` positions."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)
    return temperature ** 2 * (per_position * mask).sum() / mask.sum().clamp(min=1)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the raw logits over the ``mask`` positions and the vocabulary."""
    per_position = (student_logits.float() - teacher_logits.float()).pow(2).mean(dim=-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


class Distill:
    def __init__(self, teacher: torch.nn.Module, *, temperature: float, alpha: float, loss: str) -> None:
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.loss = loss

    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        with torch.no_grad():
            return self.teacher(**inputs).logits

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**model_inputs(batch))
        hard = out.loss
        teacher = self.teacher_logits(batch)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # the positions the hard loss counts
        student, teacher = out.logits[:, :-1, :], teacher[:, :-1, :]
        if self.loss == "kl":
            soft = soft_kl(student, teacher, mask, self.temperature)
        else:
            soft = logit_mse(student, teacher, mask)
        loss = self.alpha * soft + (1.0 - self.alpha) * hard
        return loss, {"soft_loss": soft.detach(), "hard_loss": hard.detach()}


def teacher_dtype(choice: str, device: torch.device, bf16_supported: bool) -> torch.dtype:
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and bf16_supported else torch.float32


def vocab_rows(model: Any) -> int:
    """The number of rows of the model's output layer (its vocabulary as the logits see it)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return int(model.config.vocab_size)
    return int(head.weight.shape[0])


def load_teacher(params: Any, *, device: torch.device, bf16_supported: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from effitrain.config.inputs import check_model_folder

    check_model_folder("objective.teacher", params.teacher, revision=None, need_tokenizer=False)
    teacher = AutoModelForCausalLM.from_pretrained(params.teacher,
                                                   dtype=teacher_dtype(params.teacher_dtype, device, bf16_supported))
    teacher.to(device)
    teacher.eval()  # dropout off: the soft targets are the teacher's predictions, not a random perturbation of them
    teacher.requires_grad_(False)
    return teacher


def check_same_tokenizer(teacher_path: str, tokenizer: Any) -> None:
    """Logits are compared id by id, so equal vocabulary sizes are not enough: a teacher folder that carries its
    tokenizer must map every token to the id the run's tokenizer gives it."""
    from pathlib import Path

    from effitrain.config.inputs import TOKENIZER_FILES

    folder = Path(teacher_path).expanduser()
    if tokenizer is None or not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(str(folder)).get_vocab(), tokenizer.get_vocab()
    differ = sum(1 for token, i in ours.items() if theirs.get(token) != i) + len(set(theirs) - set(ours))
    if differ:
        raise ConfigError(f"objective.teacher: the tokenizer saved with the teacher at {teacher_path} differs from "
                          f"the run's ({differ} of {len(ours)} tokens have another id or are missing); distill from "
                          f"a teacher trained with the same tokenizer (e.g. on the same data and model.vocab_size)")


def build(params: Any, *, model: Any, device: Any = "cpu", bf16_supported: bool = False, tokenizer: Any = None,
          **context: Any) -> Distill:
    device = torch.device(device)
    teacher = load_teacher(params, device=device, bf16_supported=bf16_supported)
    student_vocab, teacher_vocab = vocab_rows(model), vocab_rows(teacher)
    if student_vocab != teacher_vocab:
        raise ConfigError(f"objective.teacher: the teacher at {params.teacher} has a vocabulary of {teacher_vocab} "
                          f"tokens, the student {student_vocab}; distillation compares their logits token by token, "
                          f"so both need the same tokenizer")
    check_same_tokenizer(params.teacher, tokenizer)
    return Distill(teacher, temperature=params.temperature, alpha=params.alpha, loss=params.loss)
