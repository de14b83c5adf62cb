"""Checks shared by the tests of our CPU GEMMs (bf16 and float32)."""
from __future__ import annotations

import torch


def assert_rows_independent_of_batch_and_threads(gemm, x: torch.Tensor, panels) -> None:
    """Bit for bit: rows of x computed in the whole batch (rows split between threads), alone
    (weight panels split), at another position, and on one thread."""
    full = gemm(x, panels)
    for i in (0, 5, 131, x.shape[0] - 1):
        assert torch.equal(gemm(x[i:i + 1], panels), full[i:i + 1])
    assert torch.equal(gemm(x[3:70], panels), full[3:70])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(gemm(x, panels), full)
    finally:
        torch.set_num_threads(threads)
