"""Decompositions whose result does not depend on how many CPU threads the process runs.

The LAPACK SVD of the MKL that torch's CPU wheels ship returns different last bits with one thread and with two
(torch 2.13: a 128 x 512 fp32 matrix gives other singular vectors under ``torch.set_num_threads(1)`` than under
``(2)``; 64 x 64 does not).  A method that decomposes gradients or weights *during* training (GaLore's projector
refresh, sparse spectral training's rounds) then follows another trajectory whenever the thread count differs:
``OMP_NUM_THREADS`` set in one shell and not in the other, a requeued job on a node with other cores, ``torchrun``
(which sets one thread per process).  Measured on the tiny model: GaLore's losses at 1 and 2 threads part by 1e-3
within 14 steps, while AdamW's stay bit-identical.  So on the CPU the decomposition runs on one thread, which
costs little at the sizes a CPU trains; on a GPU the thread count plays no part.
"""

from __future__ import annotations

import torch


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, the same to the last bit at any CPU thread count."""
    if matrix.device.type != "cpu":
        return torch.linalg.svd(matrix, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    finally:
        torch.set_num_threads(threads)
