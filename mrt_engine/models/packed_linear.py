"""Linear layers with oneDNN-prepacked weights on the CPU, and our bf16 GEMM for the LM head.

PyTorch's plain CPU GEMM repacks the weight on every call; at decode sizes (a few hundred rows)
that repacking is a large part of the call. oneDNN's prepacked layout (the one torch.compile's
freezing uses) measured on the 2-core dev box, M = 256 rows: float32 ~200-220 GFLOP/s vs 130-170,
bfloat16 410-440 vs 380-400, and bfloat16 results bit-identical to `F.linear`.

The packed copy is made on first use and dropped whenever the model's weights change through
`LlamaModel.load_weights` (the only writer: checkpoint loading and `LLM.update_weights`), so it is
never stale. It costs a second copy of the linear weights in memory; `MRT_ENGINE_PACKED_LINEAR=0`
turns it off. Anything that is not a CPU float32/bfloat16 weight, or a torch without the ops,
keeps `F.linear`.

The bf16 LM head on a CPU with AVX512_BF16 uses our GEMM (csrc/cpu_gemm.cpp) on weights packed in
column panels of 96 (`Bf16Panels`), which writes into the runner's logits buffer: PyTorch's plain
bf16 GEMM ran at 335-350 GFLOP/s at Qwen2.5-0.5B's LM head (256 rows, 151,936 words) on the dev box,
oneDNN's prepacked one ~360 but only into a fresh tensor (a vocab-sized copy after it), ours ~410
(dot-product peak 465); in the engine the LM head's section took 3-6% less at that shape. Like
the layers' copies, it costs a second copy of the head (272 MB at that shape). The decoder layers
keep oneDNN's: with their weights streamed from memory (a real model's layers do not stay in
cache) both GEMMs ran at the same ~410 GFLOP/s, and whole fork calls at the Qwen shape with ours on
the layers as well ran 0.99x. `MRT_ENGINE_CPU_GEMM=0` turns ours off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from mrt_engine.models import triton_ops

try:
    from mrt_engine import _C  # type: ignore[attr-defined]
    _GEMM_OK = bool(getattr(_C, "gemm_bf16_available", lambda: False)())
except ImportError:  # the extension is optional
    _C, _GEMM_OK = None, False

ENV = "MRT_ENGINE_PACKED_LINEAR"
GEMM_ENV = "MRT_ENGINE_CPU_GEMM"
_ROWS_HINT = 256   # the batch size oneDNN tunes the layout for; any row count works


def _ops_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_AVAILABLE = _ops_available()


def enabled_for(weight: torch.Tensor) -> bool:
    return (_AVAILABLE and os.environ.get(ENV, "1") != "0" and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16))


class Bf16Panels:
    """A bf16 weight [n, k] packed for `_C.gemm_bf16`: int32 words [n_pad / 96, k / 2, 96], each the
    pair (w[col][2p], w[col][2p + 1]), columns padded with zeros to a multiple of 96."""

    __slots__ = ("data", "n", "k")

    def __init__(self, weight: torch.Tensor):
        n, k = weight.shape
        width = _C.GEMM_PANEL
        n_pad = -(-n // width) * width
        words = weight.detach().contiguous().view(torch.int32)             # [n, k / 2]
        if n_pad != n:
            words = torch.cat([words, words.new_zeros(n_pad - n, k // 2)])
        self.data = words.view(n_pad // width, width, k // 2).transpose(1, 2).contiguous()
        self.n, self.k = n, k


def bf16_gemm_packable(weight: torch.Tensor) -> bool:
    """Whether our bf16 GEMM takes this [n, k] weight (n % 16 == 0, k even) on this CPU."""
    return (_GEMM_OK and os.environ.get(GEMM_ENV, "1") != "0" and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[0] % 16 == 0
            and weight.shape[1] % 2 == 0)


def gemm_usable(x: torch.Tensor, panels: Bf16Panels) -> bool:
    """x [m, k] bf16 whose rows start on 4-byte boundaries (pairs of k are read as 32-bit words)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.shape[1] == panels.k
            and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0)


def out_usable(out: torch.Tensor | None, m: int, panels: Bf16Panels) -> bool:
    """Whether `out` (None: a fresh tensor) can take gemm_bf16's [m, n] result in place."""
    return out is None or (out.dtype == torch.bfloat16 and out.device.type == "cpu" and out.dim() == 2
                           and tuple(out.shape) == (m, panels.n) and out.stride(1) == 1)


def gemm_bf16(x: torch.Tensor, panels: Bf16Panels, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] . w^T in bf16 with our GEMM, into `out` [m, n] if given."""
    if not gemm_usable(x, panels):
        raise ValueError(f"gemm_bf16 expects a bf16 CPU x [m, {panels.k}] with contiguous, 4-byte aligned rows, "
                         f"got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, panels.n, dtype=torch.bfloat16)
    elif not out_usable(out, m, panels):
        raise ValueError(f"gemm_bf16 expects out as a bf16 CPU [{m}, {panels.n}] with contiguous rows")
    _C.gemm_bf16(x.data_ptr(), x.stride(0), m, panels.k, panels.data.data_ptr(), panels.n, out.data_ptr(),
                 out.stride(0), torch.get_num_threads())
    return out


def pack(weight: torch.Tensor, lm_head: bool = False) -> torch.Tensor | Bf16Panels | None:
    """The prepacked copy of a [N, K] weight (oneDNN's), or None where packing is off or unavailable.
    For the LM head in bf16: `Bf16Panels` where our GEMM applies, else None (oneDNN's bf16 gain is
    smaller than the copy of its vocab-sized output into the runner's buffer)."""
    if not enabled_for(weight):
        return None
    if lm_head and weight.dtype == torch.bfloat16:
        return Bf16Panels(weight) if bf16_gemm_packable(weight) else None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
    except RuntimeError:  # a build whose oneDNN rejects this dtype/ISA: plain GEMMs
        return None


def linear(x: torch.Tensor, packed: torch.Tensor | Bf16Panels | None, weight: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through `packed` where it applies. `out` [m, n] (2-D x): the result
    goes there: in place by our GEMM or torch.mm, copied after oneDNN's (which returns a new tensor)."""
    if (isinstance(packed, Bf16Panels) and bias is None and gemm_usable(x, packed)
            and out_usable(out, x.shape[0], packed)):
        return gemm_bf16(x, packed, out=out)
    if isinstance(packed, torch.Tensor) and x.dim() == 2:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    elif out is not None and bias is None:
        return torch.mm(x, weight.t(), out=out)
    else:
        y = F.linear(x, weight, bias)
    return y if out is None else out.copy_(y)


class LazyPacked:
    """A weight's prepacked copy, made on first use (None where packing is off or unavailable);
    `drop()` when the weight has changed."""

    __slots__ = ("packed", "_tried", "lm_head")

    def __init__(self, lm_head: bool = False):
        self.lm_head = lm_head
        self.drop()

    def drop(self) -> None:
        self.packed, self._tried = None, False

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if not self._tried:
            self.packed, self._tried = pack(weight, self.lm_head), True
        return self.packed


class PackedLinear(nn.Linear):
    """nn.Linear whose forward uses a prepacked copy of its weight (made lazily, dropped by `unpack`).

    `batch_invariant` (set by the model in deterministic mode) routes it through the fixed-tile
    Triton GEMM instead, whose rows do not depend on the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_weight = LazyPacked()
        self.batch_invariant = False

    def unpack(self) -> None:
        self.packed_weight.drop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and x.dim() == 2:
            return triton_ops.batch_invariant_linear(x, self.weight, self.bias)
        return linear(x, self.packed_weight.get(self.weight), self.weight, self.bias)
