"""silu_mul: the MLP's silu(gate) * up in one launch (the torch path is two, plus a temporary).

Reads gate_up [N, 2I] (gate | up, as the fused gate_up projection writes it) and writes [N, I].
Rounding as torch's two ops: silu in fp32, rounded to the dtype, then the product rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.checks import (FLOAT_DTYPES, cdiv, check_inner_contiguous, check_launchable,
                                       check_tensor, output)
from mrt_engine.kernels.rounding import round_to

BLOCK = 1024              # columns per program


@triton.jit
def silu_mul_kernel(
    x_ptr, out_ptr,             # x [N, 2I], out [N, I]
    stride_xn, stride_on,
    n_cols,                     # I
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xn + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    act = round_to(gate / (1.0 + tl.exp(-gate)), ty)
    tl.store(out_ptr + row * stride_on + cols, round_to(act * up, ty).to(ty), mask=mask)


def silu_mul_config() -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    return dict(BLOCK=BLOCK)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] for gate_up [N, 2I] -> [N, I] (or into `out`)."""
    check_tensor("gate_up", gate_up, 2, FLOAT_DTYPES)
    check_inner_contiguous("gate_up", gate_up)
    n, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up must be [N, 2I] (gate | up), got an odd width {two_i}")
    i = two_i // 2
    out = output(out, (n, i), gate_up.dtype, gate_up.device)
    if n == 0 or i == 0:
        return out
    check_launchable(silu_mul_kernel, gate_up, out)
    silu_mul_kernel[(n, cdiv(i, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), i,
                                                **silu_mul_config(), num_warps=4)
    return out
