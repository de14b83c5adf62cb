"""merge: combine S fp32 partials (o, lse) per (row, head) by log-sum-exp.

Kernel -> launcher -> public function. Program (row, head) walks the S slots in order, twice: once
for the max lse, once for the weighted sum. The fixed sequential order makes the result independent
of S beyond the non-empty slots: an empty slot (lse = -inf) adds an exact 0.0 and its o is not
read, so trailing or interleaved empty slots never change a bit (deterministic mode relies on
this). All-empty gives o = 0, lse = -inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.checks import FLOAT_DTYPES, check_inner_contiguous, check_launchable, check_tensor, next_pow2


@triton.jit
def merge_kernel(
    o_parts_ptr,                # [R, H, S, Dh] fp32
    lse_parts_ptr,              # [R, H, S] fp32
    out_ptr,                    # [R, H, Dh]
    out_lse_ptr,                # [R, H] fp32
    num_slots,
    stride_pr, stride_ph, stride_ps,
    stride_lr, stride_lh, stride_ls,
    stride_or, stride_oh,
    stride_olr, stride_olh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    lse_row = lse_parts_ptr + row * stride_lr + head * stride_lh
    o_row = o_parts_ptr + row * stride_pr + head * stride_ph

    m = tl.full([1], float("-inf"), tl.float32)
    for s in range(num_slots):
        m = tl.maximum(m, tl.load(lse_row + s * stride_ls + tl.arange(0, 1)))
    m_safe = tl.where(m == float("-inf"), 0.0, m)        # all empty: keep exp() finite
    den = tl.full([1], 0.0, tl.float32)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for s in range(num_slots):
        w = tl.exp(tl.load(lse_row + s * stride_ls + tl.arange(0, 1)) - m_safe)   # exp(-inf) = 0 exactly
        # an empty slot's o is never read, so callers only need to set its lse to -inf
        o_s = tl.load(o_row + s * stride_ps + d, mask=dmask & (w > 0.0), other=0.0)
        acc += w * o_s
        den += w
    nonempty = den > 0.0
    o = acc / tl.where(nonempty, den, 1.0)
    lse = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, den, 1.0)), float("-inf"))
    tl.store(out_ptr + row * stride_or + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(out_lse_ptr + row * stride_olr + head * stride_olh + tl.arange(0, 1), lse)


def merge_config(head_dim: int) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)))


def _launch(o_parts, lse_parts, out_dtype, out):
    check_tensor("o_parts", o_parts, 4, (torch.float32,))
    check_tensor("lse_parts", lse_parts, 3, (torch.float32,), o_parts.device)
    check_inner_contiguous("o_parts", o_parts)
    r, h, s, dh = o_parts.shape
    if tuple(lse_parts.shape) != (r, h, s):
        raise ValueError(f"lse_parts must be {(r, h, s)} to match o_parts, got {tuple(lse_parts.shape)}")
    if out is None:
        if out_dtype not in FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
        out = torch.empty(r, h, dh, dtype=out_dtype, device=o_parts.device)
    check_tensor("out", out, 3, FLOAT_DTYPES, o_parts.device)
    check_inner_contiguous("out", out)
    if tuple(out.shape) != (r, h, dh):
        raise ValueError(f"out must be {(r, h, dh)}, got {tuple(out.shape)}")
    out_lse = torch.empty(r, h, dtype=torch.float32, device=o_parts.device)
    if r == 0 or h == 0:
        return out, out_lse
    check_launchable(merge_kernel, o_parts, out)
    merge_kernel[(r, h)](
        o_parts, lse_parts, out, out_lse, s,
        o_parts.stride(0), o_parts.stride(1), o_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        out.stride(0), out.stride(1), out_lse.stride(0), out_lse.stride(1),
        **merge_config(dh), num_warps=1,
    )
    return out, out_lse


def merge(o_parts: torch.Tensor, lse_parts: torch.Tensor, *, out_dtype: torch.dtype = torch.float32, out=None):
    """LSE-merge partials o [R, H, S, Dh], lse [R, H, S] (fp32) -> (o [R, H, Dh], lse [R, H] fp32).

    `out` (any float dtype, e.g. the model's activations) receives o in place; else out_dtype is used.
    """
    return _launch(o_parts, lse_parts, out_dtype, out)
