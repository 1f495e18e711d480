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

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """A group with ``"muon": True`` is stepped by ``torch.optim.Muon``; every other group by ``torch.optim.AdamW``.

    Each group carries the hyper-parameters of its own update (Muon's momentum/NS settings, or AdamW's betas/eps);
    both inner optimizers fill their defaults into the shared group dicts when they are built.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, lr: float, momentum: float,
                 nesterov: bool, ns_steps: int, adjust_lr: str, betas: tuple[float, float], eps: float) -> None:
        for g in muon_groups:
            g["muon"] = True
        for g in adamw_groups:
            g["muon"] = False
        # Built first so that they complete each group with their defaults; this optimizer then adopts the very same
        # dicts (Optimizer.add_param_group keeps the dict object and only setdefaults).
        self._muon = (torch.optim.Muon(muon_groups, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                       adjust_lr_fn=adjust_lr) if muon_groups else None)
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps) if adamw_groups else None
        super().__init__(muon_groups + adamw_groups, {"lr": lr, "muon": False})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after ``load_state_dict``, which
        replaces both)."""
        for inner, want in ((self._muon, True), (self._adamw, False)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["muon"] == want]
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
        for inner in (self._muon, self._adamw):
            if inner is not None:
                inner.step()
        return loss

    def muon_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups if g["muon"] for p in g["params"]]


def split_for_muon(model: torch.nn.Module) -> tuple[list, list, list]:
    """(hidden 2-D weights for Muon, other matrices for decayed AdamW, vectors for undecayed AdamW)."""
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


def build_muon(params, model: torch.nn.Module, *, max_steps=None) -> MuonWithAdamW:
    hidden, matrices, vectors = split_for_muon(model)
    adamw_lr = params.adamw_lr if params.adamw_lr is not None else params.lr
    muon_groups = [{"params": hidden, "weight_decay": params.weight_decay}] if hidden else []
    adamw_groups = [g for g in ({"params": matrices, "weight_decay": params.weight_decay, "lr": adamw_lr},
                                {"params": vectors, "weight_decay": 0.0, "lr": adamw_lr}) if g["params"]]
    return MuonWithAdamW(muon_groups, adamw_groups, lr=params.lr, momentum=params.momentum,
                         nesterov=params.nesterov, ns_steps=params.ns_steps, adjust_lr=params.adjust_lr,
                         betas=(params.beta1, params.beta2), eps=params.eps)
