"""Per-token loss weights: the coefficient of each trained token's loss in the scalar loss, ``loss = sum_t w_t l_t``.

Every token-level objective reduces its per-token losses with some normalisation (SFT: the mean over the
micro-batch's assistant tokens; GRPO: its ``loss_type``).  That normalisation *is* a set of weights, and a method
that wants to weigh tokens differently (one control token as much as a whole response, a span more than the rest)
states its weights in the same terms, so no objective needs to know the method:

* ``batch["token_weights"]`` (:data:`effitrain.objectives.common.TOKEN_WEIGHTS`), set by a method hook in
  ``on_batch_start``, is either a tensor or a callable returning one;
* ``sft`` reads it as ``[B, S]`` aligned with ``labels`` (the weight of label position ``s``; the callable gets the
  labels' trained-token mask ``[B, S]``): ``loss = sum_s w_s l_s`` over the labelled positions;
* ``grpo`` samples its completions inside the objective, so a hook cannot know their shape in advance: there the
  value is a callable ``(completions [N, C], mask [N, C]) -> [N, C]`` (or the objective's own weighting, e.g.
  :class:`DecoupledControl` from ``objective.grpo.decoupled_alpha``), and ``loss = sum_t w_t l_t`` over the completion
  tokens, the clipped surrogate plus the KL term of each token;
* without weights each objective keeps its own normalisation, computed as before, bit for bit.

:func:`normalisation_weights` gives the weights each GRPO ``loss_type`` implies, so a weighting can start from the
default and change a part of it; the tests check that they reproduce the default losses.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from effitrain.errors import RunFailed

TokenWeights = Union[torch.Tensor, Callable[..., torch.Tensor]]


def normalisation_weights(mask: torch.Tensor, loss_type: str, *, max_new_tokens: Optional[int] = None,
                          global_tokens: Optional[float] = None, world_size: int = 1) -> torch.Tensor:
    """``[N, T]`` weights with which ``sum(w * per_token)`` is GRPO's loss of that ``loss_type`` (the tokens outside
    ``mask`` weigh 0): ``grpo`` 1 / (N |o_i|), ``bnpo`` 1 / (completion tokens), ``dr_grpo`` 1 / (N max_new_tokens),
    ``dapo`` world_size / (completion tokens on all ranks)."""
    mask = mask.to(torch.float32)
    n, width = mask.shape
    if loss_type == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * n)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return mask / (n * (max_new_tokens or width))
    if loss_type == "dapo":
        counted = float(global_tokens) if global_tokens is not None else float(mask.sum())
        return mask / (max(counted, 1.0) / world_size)
    raise ValueError(f"loss_type: {loss_type!r}")


class DecoupledControl:
    """Thinkless's decoupled GRPO (DeGRPO, Fang et al. 2505.13379, section 3.2): the first completion token (the
    control token, ``<short>`` or ``<think>``) and the response tokens after it are normalised apart::

        loss = 1/N sum_i [ alpha * l_i0  +  1/T_i sum_{t=1..T_i} l_it ]            (response: sequence, the paper)
        loss = alpha/N sum_i l_i0  +  sum_{i, t>=1} l_it / sum_i T_i                 (response: token, the authors'
                                                                                      verl code: masked means)

    Under GRPO's own normalisation the control token of completion i weighs 1 / (N (T_i + 1)): a long reasoning
    answer's mode choice learns T times more slowly than a short answer's, which the paper shows makes the policy
    collapse onto one mode.  Here it weighs alpha / N whatever the length (T_i: the completion's tokens after the
    control token, EOS included)."""

    def __init__(self, alpha: float, response: str = "sequence") -> None:
        if response not in ("sequence", "token"):
            raise ValueError(f"response: {response!r}")
        self.alpha, self.response = float(alpha), response

    def __call__(self, completions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(torch.float32)
        n = mask.shape[0]
        control = torch.zeros_like(mask)
        control[:, 0] = mask[:, 0]
        response = mask.clone()
        response[:, 0] = 0.0
        if self.response == "sequence":
            response = response / (response.sum(-1, keepdim=True).clamp(min=1.0) * n)
        else:
            response = response / response.sum().clamp(min=1.0)
        return self.alpha * control / n + response


def checked(weights: Any, shape: tuple[int, ...], key: str, device: Any) -> torch.Tensor:
    """``weights`` as a float32 tensor of ``shape`` on ``device``, or a readable stop naming who supplied them."""
    weights = torch.as_tensor(weights, device=device, dtype=torch.float32)
    if tuple(weights.shape) != tuple(shape):
        raise RunFailed(f"{key}: the token weights have shape {tuple(weights.shape)}, expected {tuple(shape)} (one "
                        f"weight per token of the micro-batch)")
    return weights


def weighted_sum(per_token: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(w * l)`` over the trained tokens (the weights of untrained positions never count)."""
    return (per_token * weights.to(per_token.dtype) * mask.to(per_token.dtype)).sum()
