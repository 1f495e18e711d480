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

Intermediate-representation terms (``hint``, ``attention``, ``pkt``; torchdistill's losses, see
:mod:`effitrain.objectives.feature_losses`) are added to the total with their own weights; they read the hidden states
of both models (``output_hidden_states=True``, asked for only when one of them is on).  FitNets' regressor is
attached to the student as a training-only module (:mod:`effitrain.models.training_only`) when the objective is
built, before the optimizer, so it trains, is reduced and is checkpointed with the student and is dropped at export.

``timeline.distill_weight``, when declared, replaces ``alpha`` step by step (SALT's early KD phase, decaying to plain
next-token training).  At a weight of 0 with no intermediate term the teacher is not run at all.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from effitrain.objectives.common import IGNORE_INDEX, model_inputs
from effitrain.objectives.feature_losses import attention_transfer_loss, hint_loss, pkt_loss
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
    def __init__(self, teacher: torch.nn.Module, *, temperature: float, alpha: float, loss: str,
                 hint: Any = None, regressor: Optional[torch.nn.Module] = None, attention: Any = None,
                 pkt: Any = None) -> None:
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.loss = loss
        self.hint, self.regressor, self.attention, self.pkt = hint, regressor, attention, pkt
        self.features = hint is not None or attention is not None or pkt is not None

    def soft_weight(self, state: Any) -> float:
        """``alpha``, or the timeline's ``distill_weight`` at this step when the run declares one."""
        timeline = getattr(state, "timeline", None)
        if timeline is not None and timeline.declares("distill_weight"):
            return float(timeline.value("distill_weight", state.step))
        return self.alpha

    def teacher_outputs(self, batch: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        with torch.no_grad():
            return self.teacher(**inputs, output_hidden_states=self.features)

    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.teacher_outputs(batch).logits

    def __call__(self, model: Any, batch: dict[str, Any], state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weight = self.soft_weight(state)
        if weight == 0.0 and not self.features:  # past SALT's KD phase: plain next-token training, no teacher pass
            out = model(**model_inputs(batch))
            zero = out.loss.detach() * 0
            return out.loss, {"soft_loss": zero, "hard_loss": out.loss.detach(), "distill_weight": zero}
        out = model(**model_inputs(batch), **({"output_hidden_states": True} if self.features else {}))
        hard = out.loss
        teacher = self.teacher_outputs(batch)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # the positions the hard loss counts
        student_logits, teacher_logits = out.logits[:, :-1, :], teacher.logits[:, :-1, :]
        if self.loss == "kl":
            soft = soft_kl(student_logits, teacher_logits, mask, self.temperature)
        else:
            soft = logit_mse(student_logits, teacher_logits, mask)
        loss = weight * soft + (1.0 - weight) * hard
        metrics = {"soft_loss": soft.detach(), "hard_loss": hard.detach(),
                   "distill_weight": torch.tensor(weight, device=hard.device)}
        if self.features:
            extra, terms = self.feature_terms(out.hidden_states, teacher.hidden_states, mask)
            loss = loss + extra
            metrics.update(terms)
        return loss, metrics

    def feature_terms(self, student: tuple, teacher: tuple, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The weighted sum of the configured intermediate terms, and each unweighted term as a metric."""
        total, metrics = 0.0, {}
        if self.hint is not None:
            guided = student[self.hint.student_layer][:, :-1, :]
            if self.regressor is not None:
                guided = self.regressor(guided)
            term = hint_loss(guided, teacher[self.hint.teacher_layer][:, :-1, :], mask, self.hint.normalize)
            total, metrics["hint_loss"] = total + self.hint.weight * term, term.detach()
        if self.attention is not None:
            term = sum(attention_transfer_loss(student[s], teacher[t], self.attention.mode)
                       for s, t in self.attention.pairs)
            total, metrics["at_loss"] = total + self.attention.weight * term, term.detach()
        if self.pkt is not None:
            rows = mask.reshape(-1)  # every counted token position of the micro-batch is one representation
            s = student[self.pkt.student_layer][:, :-1, :].reshape(rows.shape[0], -1)[rows]
            t = teacher[self.pkt.teacher_layer][:, :-1, :].reshape(rows.shape[0], -1)[rows]
            term = pkt_loss(s, t)
            total, metrics["pkt_loss"] = total + self.pkt.weight * term, term.detach()
        return total, metrics


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


def check_same_tokenizer(teacher_path: str, tokenizer: Any, key: str = "objective.teacher") -> None:
    """Logits are compared id by id, so equal vocabulary sizes are not enough: a teacher (or reference) folder that
    carries its tokenizer must map every token to the id the run's tokenizer gives it."""
    from pathlib import Path

    from effitrain.config.inputs import TOKENIZER_FILES

    folder = Path(teacher_path).expanduser()
    if tokenizer is None or not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(str(folder)).get_vocab(), tokenizer.get_vocab()
    differ = sum(1 for token, i in ours.items() if theirs.get(token) != i) + len(set(theirs) - set(ours))
    if differ:
        raise ConfigError(f"{key}: the tokenizer saved with the model at {teacher_path} differs from the run's "
                          f"({differ} of {len(ours)} tokens have another id or are missing); use a model trained "
                          f"with the same tokenizer (e.g. on the same data and model.vocab_size)")


def decoder_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


def hidden_width(model: Any) -> int:
    return int(model.config.hidden_size)


def check_layers(params: Any, student: Any, teacher: Any) -> None:
    """Every layer a term names exists in its model (hidden_states[1..L])."""
    named = []
    if params.hint is not None:
        named.append(("hint", params.hint.student_layer, params.hint.teacher_layer))
    if params.attention is not None:
        named += [(f"attention.pairs[{i}]", s, t) for i, (s, t) in enumerate(params.attention.pairs)]
    if params.pkt is not None:
        named.append(("pkt", params.pkt.student_layer, params.pkt.teacher_layer))
    for key, s, t in named:
        for who, layer, model in (("student", s, student), ("teacher", t, teacher)):
            if layer > decoder_layers(model):
                raise ConfigError(f"objective.{key}: {who} layer {layer} does not exist; the {who} has "
                                  f"{decoder_layers(model)} decoder layers (counted from 1)")


def hint_regressor(params: Any, model: Any, teacher: Any) -> Optional[torch.nn.Module]:
    """FitNets' regressor from the student's width to the teacher's, attached to the student (trained, reduced and
    checkpointed with it, dropped at export); none when the widths agree."""
    if params.hint is None or hidden_width(model) == hidden_width(teacher):
        return None
    from effitrain.models.training_only import attach

    # torch's default nn.Linear initialisation, as torchdistill's ConvReg keeps its layers' defaults
    regressor = torch.nn.Linear(hidden_width(model), hidden_width(teacher))
    dtype = next(model.parameters()).dtype
    return attach(model, "hint_regressor", regressor.to(dtype))


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
    check_layers(params, model, teacher)
    return Distill(teacher, temperature=params.temperature, alpha=params.alpha, loss=params.loss,
                   hint=params.hint, regressor=hint_regressor(params, model, teacher), attention=params.attention,
                   pkt=params.pkt)
