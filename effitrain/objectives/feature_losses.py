"""torchdistill's intermediate-representation losses, for causal LMs (``objective: distill`` with ``hint``,
``attention`` or ``pkt``).

Each function takes hidden states as transformers returns them (``[B, S, H]``, ``hidden_states[k]`` the output of
decoder layer k) and follows the formula of torchdistill's module (``torchdistill/losses/mid_level.py`` and the
FitNets sample config, read at commit 3e4373c) with one change of axes: torchdistill's feature maps are CNN
activations ``[B, C, h, w]``; here the channels are the hidden size (last axis) and the spatial positions are the
token positions.

* **Hint (FitNets, 1412.6550).** torchdistill: ``MSELoss(reduction='sum')`` between the student's guided layer passed
  through a regressor (``ConvReg``: 1x1 conv + BN + ReLU for CNNs) and the teacher's hint layer.  Here: the squared
  error summed over the hidden units, averaged over the token positions (torchdistill's sum divided by the number of
  positions, so the weight does not depend on batch size and sequence length; ``normalize: true`` further divides by
  the teacher's mean squared norm, an addition of ours).  The regressor is a plain
  ``nn.Linear(H_student, H_teacher)`` (no ReLU: transformer hidden states are signed), present only when the widths
  differ.
* **Attention transfer (Zagoruyko & Komodakis, 1612.03928), torchdistill's ``ATLoss``.**  The map of a sequence is
  ``normalize(f.pow(2).mean(channels))`` over its positions; ``mode: code`` (torchdistill's default, the authors'
  code) is ``(a_s - a_t).pow(2).mean()``; ``mode: paper`` (Eq. 2) is ``||a_s - a_t||_2`` per sequence, summed over
  the batch and divided by the batch size.  Widths may differ (the map averages over the channels).
* **PKT (Passalis & Tefas, ECCV 2018), torchdistill's ``PKTLoss``.**  Rows are representations (here: every counted
  token position of the micro-batch); each is L2-normalized (``+ eps``), cosine similarities are mapped to
  ``(c + 1) / 2`` and normalized per row into probabilities, and the loss is
  ``mean(p_t * log((p_t + eps) / (p_s + eps)))`` over all entries, ``eps = 1e-7``.  Widths may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PKT_EPS = 1e-7  # torchdistill's PKTLoss default


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
              normalize: bool = False) -> torch.Tensor:
    """Squared error summed over hidden units, averaged over the ``mask`` positions.  ``student`` is already through
    the regressor (same width as ``teacher``).  ``normalize`` divides by the teacher's squared norm averaged the same
    way (no gradient: the teacher is frozen), so the term is a relative error whatever the residual stream's scale."""
    count = mask.sum().clamp(min=1)
    loss = ((student.float() - teacher.float()).pow(2).sum(dim=-1) * mask).sum() / count
    if normalize:
        loss = loss / ((teacher.float().pow(2).sum(dim=-1) * mask).sum() / count).clamp(min=1e-12)
    return loss


def attention_map(hidden: torch.Tensor) -> torch.Tensor:
    """``[B, S, H] -> [B, S]``: the mean squared activation of each position, L2-normalized over the positions of
    each sequence (torchdistill's ``attention_transfer``: ``normalize(f.pow(2).mean(1).flatten(1))``)."""
    return F.normalize(hidden.float().pow(2).mean(dim=-1), dim=1)


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor, mode: str = "code") -> torch.Tensor:
    a_s, a_t = attention_map(student), attention_map(teacher)
    if mode == "paper":
        return torch.norm(a_s - a_t, dim=1).sum() / student.shape[0]
    return (a_s - a_t).pow(2).mean()


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """torchdistill's ``PKTLoss.cosine_similarity_loss`` on ``[N, H_s]`` and ``[N, H_t]`` representations."""
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        x = torch.nan_to_num(x, nan=0.0)  # torchdistill: x[x != x] = 0
        similarity = (x @ x.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s, p_t = probabilities(student), probabilities(teacher)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))
