"""Low-rank gradient projectors: one abstraction, three ways of choosing the subspace.

A projector maps an m x n gradient G to rank-r coordinates and an update in those coordinates back to m x n.  The
smaller side is projected (GaLore's "std" rule): for m >= n, ``low = G P`` with P (n x r); otherwise
``low = P^T G`` with P (m x r).  What differs between the papers is only how P is chosen and whether the low-rank
gradient is further preconditioned:

* :class:`SVDProjector` (GaLore, 2403.03507): top-r singular vectors of G, refreshed every ``update_proj_gap`` steps.
* :class:`NaturalProjector` (Natural GaLore, 2410.16029): the same subspace, plus the inverse empirical Fisher of the
  last ``s`` low-rank gradients applied to the current one through the Woodbury identity (an s x s solve).
* :class:`DCTProjector` (SVD-free, 2505.17967): P is r columns of a fixed orthonormal DCT-II basis, chosen by their
  alignment with G (one matmul + top-k, no SVD); only the column indices are stored per layer.  Optionally (the
  authors' ``rotate_subspace``, off by default) the Adam moments are rotated into the new subspace on a refresh
  (R = P_old^T P_new).

Projectors are stateless strategies: the per-parameter state (basis or indices, Fisher history) lives in the
optimizer's state dict as tensors, so checkpoints hold only tensors and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from effitrain.linalg import svd


class Projector:
    kind = "base"
    #: whether the optimizer should rotate its moments into the new subspace when the basis changes
    rotate_moments = False
    #: Adam's denominator: sqrt(v_hat) + eps (DCT-AdamW) or sqrt(v) + eps with the bias correction folded into the
    #: step size (GaLore's and Natural GaLore's AdamW); the two differ only in how eps is scaled early on
    eps_on_bias_corrected = False

    def __init__(self, rank: int, update_proj_gap: int, scale: float) -> None:
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale

    # -- geometry ---------------------------------------------------------------------------------------------
    @staticmethod
    def right_side(shape: torch.Size) -> bool:
        """Project the columns (G P) when the matrix is at least as tall as wide, else the rows (P^T G)."""
        return shape[0] >= shape[1]

    def low_rank_shape(self, shape: torch.Size) -> tuple[int, int]:
        m, n = shape
        return (m, self.rank) if self.right_side(shape) else (self.rank, n)

    def applies_to(self, shape: torch.Size) -> bool:
        """Projection only saves memory (and only makes sense) when r is below the smaller side."""
        return len(shape) == 2 and self.rank < min(shape)

    # -- per-parameter state ----------------------------------------------------------------------------------
    def needs_refresh(self, state: dict, step: int) -> bool:
        """``step`` counts this parameter's updates from 1; the basis is computed at the first update and then
        every ``update_proj_gap`` updates (steps 1, 1+gap, 1+2·gap, ...)."""
        return "proj_step" not in state or (step - 1) % self.update_proj_gap == 0

    def refresh(self, grad: torch.Tensor, state: dict, step: int) -> Optional[torch.Tensor]:
        """Recompute the basis from ``grad``; returns the rotation R (r x r) from the old basis to the new one when
        the optimizer should carry its moments over, else None."""
        old = self.basis(state, grad) if ("proj_step" in state and self.rotate_moments) else None
        self._choose(grad.float(), state)
        state["proj_step"] = torch.tensor(step)
        if old is None:
            return None
        return old.transpose(0, 1) @ self.basis(state, grad)

    def _choose(self, grad: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def basis(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """P, (side x r) with orthonormal columns."""
        return state["proj"]

    def project(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        p = self.basis(state, grad).to(grad.dtype)
        return grad @ p if self.right_side(grad.shape) else p.transpose(0, 1) @ grad

    def precondition(self, low: torch.Tensor, state: dict) -> torch.Tensor:
        """A transform of the low-rank gradient before the Adam moments see it (identity except Natural GaLore)."""
        return low

    def project_back(self, low: torch.Tensor, state: dict, shape: torch.Size) -> torch.Tensor:
        p = self.basis(state, low).to(low.dtype)
        full = low @ p.transpose(0, 1) if self.right_side(shape) else p @ low
        return full * self.scale

    @staticmethod
    def rotate(moment: torch.Tensor, rotation: torch.Tensor, right: bool) -> torch.Tensor:
        """Express low-rank coordinates of the old basis in the new one: M R (right side) or R^T M (left side)."""
        rotation = rotation.to(moment.dtype)
        return moment @ rotation if right else rotation.transpose(0, 1) @ moment


class SVDProjector(Projector):
    kind = "svd"

    def _choose(self, grad: torch.Tensor, state: dict) -> None:
        u, _, vh = svd(grad)  # the same basis at any CPU thread count (effitrain.linalg)
        if self.right_side(grad.shape):
            state["proj"] = vh[: self.rank].transpose(0, 1).contiguous()  # n x r
        else:
            state["proj"] = u[:, : self.rank].contiguous()                 # m x r


class NaturalProjector(SVDProjector):
    """GaLore's subspace, and the natural gradient F^-1 g in it with F = lambda I + G_s G_s^T.

    G_s is the d x s window of the last s flattened low-rank gradients (the current one included).  By Woodbury,
    F^-1 g = (g - G (lambda I + G^T G)^-1 G^T g) / lambda, an s x s solve.  As in the authors' projector
    (``natural_history`` = 20, ``lambda_damping`` = 1e-3): lambda is absolute, F has no 1/s normalisation, and the
    window is kept across subspace refreshes (``reset_history_on_refresh`` clears it instead, since older
    gradients are coordinates of the previous basis).
    """

    kind = "natural"

    def __init__(self, rank: int, update_proj_gap: int, scale: float, *, history: int, damping: float,
                 reset_history_on_refresh: bool = False) -> None:
        super().__init__(rank, update_proj_gap, scale)
        self.history = history
        self.damping = damping
        self.reset_history_on_refresh = reset_history_on_refresh

    def refresh(self, grad, state, step):
        if self.reset_history_on_refresh:
            state.pop("fisher_window", None)
            state.pop("fisher_count", None)
        return super().refresh(grad, state, step)

    def precondition(self, low: torch.Tensor, state: dict) -> torch.Tensor:
        g = low.reshape(-1).float()
        window = state.get("fisher_window")
        if window is None:
            window = state["fisher_window"] = torch.zeros(self.history, g.numel(), dtype=torch.float32,
                                                          device=g.device)
            state["fisher_count"] = torch.zeros((), dtype=torch.long)
        count = int(state["fisher_count"])
        window[count % self.history] = g      # a ring buffer over the last s gradients (current one included)
        state["fisher_count"] += 1
        s = min(count + 1, self.history)
        G = window[:s].transpose(0, 1)        # d x s
        lam = self.damping
        system = G.transpose(0, 1) @ G + lam * torch.eye(s, device=g.device)   # s x s
        natural = (g - G @ torch.linalg.solve(system, G.transpose(0, 1) @ g)) / lam
        return natural.reshape(low.shape).to(low.dtype)


_DCT_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def dct_basis(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix Q (n x n, columns are basis vectors), built once per size and device and
    shared by every layer of that width."""
    key = (n, str(device), dtype)
    if key not in _DCT_CACHE:
        k = torch.arange(n, dtype=torch.float64)
        i = torch.arange(n, dtype=torch.float64)
        q = torch.cos(math.pi / n * (i[:, None] + 0.5) * k[None, :]) * math.sqrt(2.0 / n)
        q[:, 0] /= math.sqrt(2.0)
        _DCT_CACHE[key] = q.to(device=device, dtype=dtype)
    return _DCT_CACHE[key]


class DCTProjector(Projector):
    kind = "dct"
    eps_on_bias_corrected = True

    def __init__(self, rank: int, update_proj_gap: int, scale: float, *, rotate_moments: bool = False) -> None:
        super().__init__(rank, update_proj_gap, scale)
        self.rotate_moments = rotate_moments

    def _side(self, shape) -> int:
        return shape[1] if self.right_side(shape) else shape[0]

    def _choose(self, grad: torch.Tensor, state: dict) -> None:
        right = self.right_side(grad.shape)
        q = dct_basis(self._side(grad.shape), grad.device)
        # alignment of each basis vector with the gradient: L1 norm of G Q's columns (or Q^T G's rows)
        scores = (grad @ q).abs().sum(0) if right else (q.transpose(0, 1) @ grad).abs().sum(1)
        state["proj_idx"] = torch.topk(scores, self.rank).indices.sort().values

    def basis(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        q = dct_basis(self._side_from_state(state, grad), grad.device)
        return q[:, state["proj_idx"].to(grad.device)]

    def _side_from_state(self, state: dict, tensor: torch.Tensor) -> int:
        return int(state["proj_side"]) if "proj_side" in state else self._side(tensor.shape)

    def refresh(self, grad, state, step):
        state["proj_side"] = torch.tensor(self._side(grad.shape))
        return super().refresh(grad, state, step)


def refresh_gap(params, max_steps) -> int:
    """Optimizer steps between subspace refreshes: ``update_proj_gap``, or ``max_steps // refreshes_per_run`` so
    that a run of any length gets the paper's number of refreshes (GaLore/APOLLO: 200 steps in a 10k-step run on
    LLaMA-60M, i.e. 50 refreshes)."""
    per_run = getattr(params, "refreshes_per_run", None)
    if per_run is None:
        return params.update_proj_gap
    if max_steps is None:
        raise ValueError("refreshes_per_run needs the run length: build the optimizer with max_steps=...")
    return max(1, int(max_steps) // per_run)


def make_projector(kind: str, params, max_steps=None) -> Projector:
    common = dict(rank=params.rank, update_proj_gap=refresh_gap(params, max_steps), scale=params.scale)
    if kind == "svd":
        return SVDProjector(**common)
    if kind == "natural":
        return NaturalProjector(**common, history=params.history, damping=params.damping,
                                reset_history_on_refresh=getattr(params, "reset_history_on_refresh", False))
    if kind == "dct":
        return DCTProjector(**common, rotate_moments=params.rotate_moments)
    raise ValueError(f"unknown projector kind {kind!r}; valid: dct, natural, svd")
