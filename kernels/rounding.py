"""round_to: an fp32 value rounded to a 16-bit dtype (nearest, ties to even), kept in fp32.

Written out with integer ops for bfloat16 because the Triton interpreter's fp32 -> bf16 cast
truncates (the GPU's rounds to nearest): with it, a kernel that must round exactly where torch
does computes the same bits on both, so the CPU tests can demand bit equality. The final
`.to(bf16)` of an already rounded value is exact either way.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, ty: tl.constexpr):
    if ty == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        r = ((b >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)        # NaN stays NaN (its payload could carry out)
    else:
        return x.to(ty).to(tl.float32)
