"""TriAdaptLoRA (Liang, Wang & Zeng, 2501.08008): LoRA whose rank grows during training, with the increment matrix
split into a lower and an upper triangular part and a normalized Frobenius norm as the importance of each module.

The update of a target module at rank r is (the authors' ``loraW.forward``)::

    dW = (alpha / r) * B @ C @ A,      C = L + U,      B: out x r,  A: r x in,  C: r x r

where the rank is grown in blocks (a first block of ``init_rank``, then ``add_rank`` at a time) and each growth
appends a block *row* to the lower-triangular L (the new row's entries for every column up to and including its own
block) and a block *column* to the upper-triangular U (every row up to and including its own block); the diagonal
blocks are in both.  The importance of a module is the change, since the previous allocation, of
``||C||_F / (number of blocks)`` (the authors' ``compute_score``); :mod:`effitrain.methods.tri_adapt_lora` grows
the modules whose importance clears a threshold set by the growth schedule.

How it sits on `peft`: the adapter *is* a `peft` LoRA of rank ``max_rank`` (peft finds the target modules, applies
dropout and ``alpha / max_rank``, saves and merges).  Its ``lora_A`` weight is re-parameterised (``torch.nn.utils.
parametrize``) as ``(max_rank / r) * C_active @ A``: slots beyond the active rank are masked out of C, so they
receive no gradient and contribute nothing, exactly as parameters that do not exist yet.  Growing a module is then
a change of its active rank - no parameters appear mid-run, so the DeepSpeed optimizer (and its ZeRO partitions,
fp32 master copies) built once at start-up stays valid.  At export the parametrisation is folded into a plain
``lora_A`` (:func:`folded_copy`), so the saved adapter is an ordinary peft LoRA that loads without effitrain.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from effitrain.peft.wrap import peft_package, wrap_model

ADAPTER = "default"  # peft's name for the one adapter a run trains


def block_ids(max_rank: int, init_rank: int, add_rank: int) -> torch.Tensor:
    """The growth block of every rank slot: slots ``< init_rank`` are block 0, then ``add_rank`` slots per block."""
    slots = torch.arange(max_rank)
    return torch.where(slots < init_rank, torch.zeros_like(slots), 1 + (slots - init_rank).div(add_rank,
                                                                                              rounding_mode="floor"))


class TriangularCore(nn.Module):
    """The parametrisation of one module's ``lora_A`` weight: ``A -> (max_rank / r) * (L + U)[:r, :r] @ A[:r]``
    (rows ``>= r`` of the result are zero).  ``rank`` is the active rank, the state the growth schedule changes."""

    def __init__(self, max_rank: int, init_rank: int, add_rank: int) -> None:
        super().__init__()
        self.max_rank, self.init_rank, self.add_rank = max_rank, init_rank, add_rank
        block = block_ids(max_rank, init_rank, add_rank)
        # L: row block >= column block (a growth's new block row); U: row block <= column block (its new column)
        self.register_buffer("lower_mask", (block[:, None] >= block[None, :]).float(), persistent=False)
        self.register_buffer("upper_mask", (block[:, None] <= block[None, :]).float(), persistent=False)
        # C starts as the identity (in L's diagonal blocks) and B at zero (peft's LoRA init), so dW starts at zero,
        # B's gradient (through C A) is not zero, and a new block adds nothing until B's new columns have trained.
        # (The authors' file initialises B and C at zero, where no gradient reaches any of the three.)
        self.c_lower = nn.Parameter(torch.eye(max_rank))
        self.c_upper = nn.Parameter(torch.zeros(max_rank, max_rank))
        self.rank = init_rank

    @property
    def blocks(self) -> int:
        """Active growth blocks: the first one, then one per growth."""
        return 1 + (self.rank - self.init_rank) // self.add_rank

    def core(self) -> torch.Tensor:
        """C = L + U restricted to the active rank (zeros elsewhere), max_rank x max_rank."""
        active = (torch.arange(self.max_rank, device=self.c_lower.device) < self.rank).to(self.c_lower.dtype)
        square = active[:, None] * active[None, :]
        return (self.c_lower * self.lower_mask + self.c_upper * self.upper_mask) * square

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # peft scales by alpha / max_rank; the authors' alpha / r is that times max_rank / r
        return (self.max_rank / self.rank) * (self.core().to(a.dtype) @ a)

    def normalized_norm(self) -> float:
        """||C||_F / blocks: the quantity whose change is the module's importance (the authors' compute_score)."""
        return float(torch.linalg.matrix_norm(self.core().detach().float(), ord="fro")) / self.blocks


def cores(model: nn.Module) -> Iterator[tuple[str, nn.Module, TriangularCore]]:
    """``(name, lora layer, core)`` of every TriAdaptLoRA module, in module order (the same on every rank)."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a and parametrize.is_parametrized(lora_a[ADAPTER]):
            for p in lora_a[ADAPTER].parametrizations["weight"]:
                if isinstance(p, TriangularCore):
                    yield name, module, p


def has_tri_adapt(model: nn.Module) -> bool:
    return next(cores(model), None) is not None


def raw_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as trained, before the parametrisation: A is max_rank x in, B is out x max_rank."""
    return layer.lora_A[ADAPTER].parametrizations["weight"].original, layer.lora_B[ADAPTER].weight


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """The authors' regulariser (AdaLoRA's): mean over modules and factors of ||A A^T - I||_F and ||B^T B - I||_F,
    over the active rank."""
    terms = []
    for _, layer, core in cores(model):
        a, b = raw_factors(layer)
        a, b = a[:core.rank], b[:, :core.rank]
        eye = torch.eye(core.rank, device=a.device, dtype=a.dtype)
        terms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def build_tri_adapt_lora(params, model):
    peft = peft_package()
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=params.max_rank, lora_alpha=params.alpha,
                             lora_dropout=params.dropout, target_modules=list(params.target_modules),
                             modules_to_save=list(params.modules_to_save) or None)
    wrapped = wrap_model(model, config)
    for module in list(wrapped.modules()):
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            ref = lora_a[ADAPTER].weight
            core = TriangularCore(params.max_rank, params.init_rank, params.add_rank).to(device=ref.device,
                                                                                         dtype=ref.dtype)
            parametrize.register_parametrization(lora_a[ADAPTER], "weight", core)
    return wrapped


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy whose ``lora_A`` weights are plain tensors holding ``(max_rank / r) C A``: an ordinary peft LoRA of rank
    ``max_rank`` (zero rows beyond each module's active rank) with the same output and the same merged weights."""
    folded = copy.deepcopy(model)
    for _, layer, _ in list(cores(folded)):
        parametrize.remove_parametrizations(layer.lora_A[ADAPTER], "weight", leave_parametrized=True)
    return folded


# ----------------------------------------------------------------------------------------------------------------
# The growth schedule (the authors' RankAllocator.compute_threshold / increase_to_target_rank)
# ----------------------------------------------------------------------------------------------------------------

def modules_to_grow(step: int, total_steps: int, warmup: int, growth: str, budget: int, total_rank: int,
                    modules: int) -> int:
    """How many modules the threshold lets grow at this allocation: the remaining budget (in ranks) times the
    schedule's progress - linearly, or exponentially (``exp(progress * ln(remaining))``, the authors' non-linear
    model) - at least 1 and at most every module."""
    progress = (step - warmup) / max(total_steps - warmup, 1)
    remaining = budget - total_rank
    if growth == "linear":
        k = int(remaining * progress)
    else:
        k = int(math.exp(progress * math.log(remaining))) if remaining > 0 else 0
    return min(max(k, 1), modules)


def select_growth(scores: dict[str, float], k: int, ranks: dict[str, int], max_rank: int, add_rank: int,
                  room: int) -> list[str]:
    """The modules that grow: importance at least the k-th largest (the threshold), highest first, while each has a
    free block and the budget has room for ``add_rank`` more ranks."""
    if not scores:
        return []
    threshold = sorted(scores.values(), reverse=True)[k - 1]
    chosen = []
    for name in sorted(scores, key=lambda n: (-scores[n], n)):
        if scores[name] < threshold or room < add_rank:
            break
        if ranks[name] + add_rank <= max_rank:
            chosen.append(name)
            room -= add_rank
    return chosen


def active_parameters(model: nn.Module) -> int:
    """Trainable numbers in use: r x (in + out) for A and B plus the active triangular entries of L and U."""
    total = 0
    for _, layer, core in cores(model):
        a, b = raw_factors(layer)
        active = torch.arange(core.max_rank, device=a.device) < core.rank
        square = (active[:, None] & active[None, :]).float()
        total += core.rank * (a.shape[1] + b.shape[0])
        total += int((core.lower_mask * square).sum() + (core.upper_mask * square).sum())
    return total


def split_shapes(core: TriangularCore) -> list[dict[str, Any]]:
    """The shape of every block of L (a block row) and U (a block column) at the active rank: what the authors'
    ``lora_C_row`` / ``lora_C_col`` lists hold."""
    shapes, start = [], 0
    for b in range(core.blocks):
        size = core.init_rank if b == 0 else core.add_rank
        end = start + size
        shapes.append({"block": b, "lower_row": (size, end), "upper_col": (end, size)})
        start = end
    return shapes
