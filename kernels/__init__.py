"""Triton kernels for paged, prefix-shared attention (installed as `mrt_engine.kernels`).

One op per file, each with a torch twin of the same signature in `reference.py`:
`kv_store`, `paged_decode`, `cascade_decode`, `extend`, `merge`, and the decoder layer's fused
elementwise ops for CUDA, `rms_norm`, `rope_`, `silu_mul` (bf16 rounding in `rounding.py`).

Triton only compiles for GPUs; on a machine without CUDA the kernels can run on CPU tensors under
the Triton interpreter, which must be switched on before `triton` is first imported. Importing this
package does that (TRITON_INTERPRET=1) when CUDA is absent and the variable is unset, so the triton
backend and the kernel tests work on CPU. An explicit TRITON_INTERPRET=0 is respected (the
ahead-of-time compile test needs real JIT functions).
"""
from __future__ import annotations

import os
import sys


def _want_interpreter() -> bool:
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return False
    import torch

    return not torch.cuda.is_available()


if _want_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
