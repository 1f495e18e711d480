"""Muon on the hidden 2-D weights and AdamW on the rest, as one ``torch.optim.Optimizer``.

The engine hands DeepSpeed one optimizer, and the LR scheduler, checkpoints and memory accounting all read that
optimizer's ``param_groups`` and ``state``.  So the two updates are torch's own ``torch.optim.Muon`` and
``torch.optim.AdamW``, kept as inner optimizers that *share* this optimizer's group dicts and state dict: the
scheduler's lr reaches both, and ``state_dict``/``load_state_dict`` are the stock ones over all parameters.

Which parameter goes where follows Moonlight's ``toy_train.py`` (and Jordan's README): every trainable 2-D weight
except the input embedding and the output head goes to Muon; the embedding, the head, norms and biases to AdamW.
The embedding and head are found through ``get_input_embeddings``/``get_output_embeddings`` rather than by name, so
a tied head is one tensor and models that name them otherwise are still handled.
"""

from __future__ import annotations

from typing import Optional

import torch


class MatrixAndAdamW(torch.optim.Optimizer):
    """A group with ``"matrix": True`` is stepped by ``matrix`` (Muon, COSMOS); every other group by ``adamw``.

    The inner optimizers are built first, so each group dict already carries its own update's hyper-parameters;
    this optimizer adopts the very same dicts (``Optimizer.add_param_group`` keeps the dict object and only
    setdefaults) and hands both inner optimizers its own ``state``.
    """

    def __init__(self, matrix: Optional[torch.optim.Optimizer], adamw: Optional[torch.optim.Optimizer]) -> None:
        self._matrix, self._adamw = matrix, adamw
        groups = []
        for inner, flag in ((matrix, True), (adamw, False)):
            if inner is not None:
                for g in inner.param_groups:
                    g["matrix"] = flag
                    groups.append(g)
        super().__init__(groups, {"matrix": False})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after ``load_state_dict``, which
        replaces both)."""
        for inner, want in ((self._matrix, True), (self._adamw, False)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["matrix"] == want]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in (self._matrix, self._adamw):
            if inner is not None:
                inner.step()
        return loss

    def matrix_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups if g["matrix"] for p in g["params"]]


def adamw_groups(matrices: list, vectors: list, *, lr: float, weight_decay: float, betas, eps: float
                 ) -> Optional[torch.optim.AdamW]:
    """torch's AdamW over the embedding/head (decayed) and the norms/biases (not decayed), as effitrain's adamw."""
    groups = [g for g in ({"params": matrices, "weight_decay": weight_decay},
                          {"params": vectors, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps) if groups else None


def split_for_muon(model: torch.nn.Module) -> tuple[list, list, list]:
    """(hidden 2-D weights for Muon or COSMOS, other matrices for decayed AdamW, vectors for undecayed AdamW)."""
    outside = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            outside.add(id(module.weight))
    hidden, matrices, vectors = [], [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 2 and id(p) not in outside:
            hidden.append(p)
        elif p.ndim >= 2:
            matrices.append(p)
        else:
            vectors.append(p)
    return hidden, matrices, vectors


def build_muon(params, model: torch.nn.Module, *, max_steps=None) -> MatrixAndAdamW:
    hidden, matrices, vectors = split_for_muon(model)
    muon = (torch.optim.Muon([{"params": hidden}], lr=params.lr, weight_decay=params.weight_decay,
                             momentum=params.momentum, nesterov=params.nesterov, ns_steps=params.ns_steps,
                             adjust_lr_fn=params.adjust_lr) if hidden else None)
    adamw_lr = params.adamw_lr if params.adamw_lr is not None else params.lr
    return MatrixAndAdamW(muon, adamw_groups(matrices, vectors, lr=adamw_lr, weight_decay=params.weight_decay,
                                             betas=(params.beta1, params.beta2), eps=params.eps))
