"""rope_: rotary embedding applied in place to a step's q|k heads, one launch (the torch path is five).

x [N, H, Dh] (any row and head strides, contiguous in Dh: the q|k slice of the fused qkv output),
cos / sin [N, 1, Dh] as `Rope.cos_sin` gives them. Per element, as the torch path
`x * cos + rotate_half(x) * sin`: each product rounded to x's dtype, then their sum. One program
per token holds all its heads' two halves, so writing back in place is safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrt_engine.kernels.checks import FLOAT_DTYPES, check_inner_contiguous, check_launchable, check_tensor, next_pow2
from mrt_engine.kernels.rounding import round_to


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr,    # x [N, H, Dh] (in place); cos, sin [N, 1, Dh]
    stride_xn, stride_xh, stride_cn, stride_sn,
    num_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    mask = (h[:, None] < num_heads) & dmask[None, :]
    lo = x_ptr + n * stride_xn + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + n * stride_cn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + n * stride_cn + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + n * stride_sn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + n * stride_sn + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    ty = x_ptr.dtype.element_ty
    # rotate_half(x) = (-x2, x1): out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2, products rounded to ty
    out1 = round_to(round_to(x1 * c1, ty) + round_to(-x2 * s1, ty), ty)
    out2 = round_to(round_to(x2 * c2, ty) + round_to(x1 * s2, ty), ty)
    tl.store(lo, out1.to(ty), mask=mask)
    tl.store(lo + HALF, out2.to(ty), mask=mask)


def rope_config(num_heads: int, head_dim: int) -> dict:
    """Compile-time constants of a launch (shared with the ahead-of-time compile test)."""
    return dict(HALF=head_dim // 2, BLOCK_H=next_pow2(num_heads),
                BLOCK_HALF=next_pow2(head_dim // 2))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [N, H, Dh] in place by cos / sin [N, 1, Dh] (x's dtype); returns x."""
    check_tensor("x", x, 3, FLOAT_DTYPES)
    check_inner_contiguous("x", x)
    n, heads, dh = x.shape
    if dh % 2:
        raise ValueError(f"rope needs an even head_dim, got {dh}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 3, (x.dtype,), x.device)
        check_inner_contiguous(name, t)
        if tuple(t.shape) != (n, 1, dh):
            raise ValueError(f"{name} must be [{n}, 1, {dh}] to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    if n == 0 or heads == 0:
        return x
    check_launchable(rope_kernel, x, cos, sin)
    rope_kernel[(n,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), heads,
                      **rope_config(heads, dh), num_warps=4)
    return x
