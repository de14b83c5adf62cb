"""Linear layers with prepacked weights on the CPU: our float32 GEMM, oneDNN's bf16 one for the
layers, our bf16 GEMM for the bf16 LM head.

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
the layers as well ran 0.99x.

Float32 weights (layers and LM head, columns a multiple of 16) use our float32 GEMM on an AVX-512F
CPU (`Fp32Panels`, csrc/cpu_gemm.cpp): at the small benchmark model's shapes (256 rows, k 384-1024)
it ran at 219-223 GFLOP/s against oneDNN's prepacked 211-222 (FMA peak 234, dev box; 126 before its
weight loads were kept out of the FMAs). What it adds is the epilogue: the bias, a residual (o_proj
and down_proj start their sums from the layer's residual stream) and a gated MLP's SiLU*up
(`PackedLinear.silu_mul`: gate and up columns packed in pairs, the [N, 2I] product never written)
run inside the GEMM, and the LM head's logits go straight into the runner's buffer. Whole fork
calls of the small benchmark model (float32) ran 1.023x faster than with oneDNN and PyTorch's
SiLU, mul and adds (12 alternated rounds in one process). `MRT_ENGINE_CPU_GEMM=0` turns ours off
(oneDNN's then takes float32 too).
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
    _GEMM_F32_OK = bool(getattr(_C, "gemm_f32_available", lambda: False)())
except ImportError:  # the extension is optional
    _C, _GEMM_OK, _GEMM_F32_OK = None, False, False

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


class Fp32Panels:
    """A float32 weight [n, k] packed for `_C.gemm_f32`: [n_pad / 96, k, 96], columns padded with
    zeros to a multiple of 96. `glu`: the weight is a gated MLP's gate rows then up rows, packed
    with each panel holding 48 gate columns then the same 48 up columns (for the fused SiLU*up)."""

    __slots__ = ("data", "n", "k", "glu", "order", "_bias")

    def __init__(self, weight: torch.Tensor, glu: bool = False):
        n, k = weight.shape
        width = _C.GEMM_PANEL
        n_pad = -(-n // width) * width
        w = weight.detach().contiguous()
        self.order = None
        if glu:
            half = n // 2
            cols = torch.arange(n).view(2, half)
            self.order = torch.cat([cols[:, c:c + width // 2].reshape(-1) for c in range(0, half, width // 2)])
            w = w[self.order]
        if n_pad != n:
            w = torch.cat([w, w.new_zeros(n_pad - n, k)])
        self.data = w.view(n_pad // width, width, k).transpose(1, 2).contiguous()
        self.n, self.k, self.glu = n, k, glu
        self._bias = (None, -1, None)   # the last bias permuted: (it, its version, the copy)

    @property
    def n_out(self) -> int:
        """Columns of the result: n, or n / 2 for a gate/up pair (silu(gate) * up)."""
        return self.n // 2 if self.glu else self.n

    def bias_for(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias in the packed column order; the permuted copy is kept until the bias is another
        tensor or changes in place (its version counter), not made again on every call."""
        if bias is None or self.order is None:
            return bias
        src, version, packed = self._bias
        if src is not bias or version != bias._version:
            packed = bias[self.order]
            self._bias = (bias, bias._version, packed)
        return packed


def f32_gemm_packable(weight: torch.Tensor, glu: bool = False) -> bool:
    """Whether our float32 GEMM takes this [n, k] weight (n % 16 == 0; glu: n % 32 == 0) on this CPU."""
    return (_GEMM_F32_OK and os.environ.get(GEMM_ENV, "1") != "0" and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.dim() == 2 and weight.shape[0] % (32 if glu else 16) == 0)


def f32_out_usable(out: torch.Tensor, m: int, panels: Fp32Panels) -> bool:
    return (out.dtype == torch.float32 and out.device.type == "cpu" and out.dim() == 2
            and tuple(out.shape) == (m, panels.n_out) and out.stride(1) == 1)


def gemm_f32(x: torch.Tensor, panels: Fp32Panels, bias: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] . w^T (+ bias) in float32 with our GEMM, into `out` [m, n] (2-D x) if given; for
    `glu` panels, silu(gate) * up [..., n / 2] instead (the product itself is never written).
    `residual` [m, n] (2-D x, not glu): added to the product, as the accumulators' starting value
    (`out` may be `residual` itself)."""
    k, n = panels.k, panels.n
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"gemm_f32 expects a float32 CPU x [..., {k}], got {tuple(x.shape)} {x.dtype} on {x.device}")
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or tuple(bias.shape) != (n,)):
        raise ValueError(f"gemm_f32 expects a float32 CPU bias [{n}], got {tuple(bias.shape)} {bias.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, n_out = x2.shape[0], panels.n_out
    if residual is not None and (panels.glu or x.dim() != 2 or residual.dtype != torch.float32
                                 or residual.device.type != "cpu" or tuple(residual.shape) != (m, n)
                                 or residual.stride(1) != 1):
        raise ValueError(f"gemm_f32 expects residual as a float32 CPU [{m}, {n}] with contiguous rows (2-D x, "
                         f"not a gate/up pair), got {tuple(residual.shape)} {residual.dtype}")
    if out is None:
        out = torch.empty(*lead, n_out, dtype=torch.float32)
        o2 = out.view(m, n_out)
    elif x.dim() == 2 and f32_out_usable(out, m, panels):
        o2 = out
    else:
        raise ValueError(f"gemm_f32 expects out as a float32 CPU [{m}, {n_out}] with contiguous rows (and a 2-D x)")
    b = panels.bias_for(bias)
    b = b.contiguous() if b is not None else None
    _C.gemm_f32(x2.data_ptr(), x2.stride(0), m, k, panels.data.data_ptr(), n, b.data_ptr() if b is not None else 0,
                o2.data_ptr(), o2.stride(0), torch.get_num_threads(), panels.glu,
                residual.data_ptr() if residual is not None else 0, residual.stride(0) if residual is not None else 0)
    return out


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


def pack(weight: torch.Tensor, lm_head: bool = False, glu: bool = False) -> torch.Tensor | Bf16Panels | Fp32Panels | None:
    """The prepacked copy of a [N, K] weight, or None where packing is off or unavailable: float32
    `Fp32Panels` where our GEMM applies, else oneDNN's. For the LM head in bf16: `Bf16Panels` where
    our GEMM applies, else None (oneDNN's bf16 gain is smaller than the copy of its vocab-sized
    output into the runner's buffer). `glu`: only `Fp32Panels` in the gate/up layout, else None."""
    if not enabled_for(weight):
        return None
    if glu:
        return Fp32Panels(weight, glu=True) if f32_gemm_packable(weight, glu=True) else None
    if f32_gemm_packable(weight):
        return Fp32Panels(weight)
    if lm_head and weight.dtype == torch.bfloat16:
        return Bf16Panels(weight) if bf16_gemm_packable(weight) else None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
    except RuntimeError:  # a build whose oneDNN rejects this dtype/ISA: plain GEMMs
        return None


def linear(x: torch.Tensor, packed: torch.Tensor | Bf16Panels | Fp32Panels | None, weight: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through `packed` where it applies. `out` [m, n] (2-D x): the result
    goes there: in place by our GEMMs or torch.mm, copied after oneDNN's (which returns a new tensor)."""
    if isinstance(packed, Fp32Panels) and not packed.glu:
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] == packed.k and (
                out is None or (x.dim() == 2 and f32_out_usable(out, x.shape[0], packed))):
            return gemm_f32(x, packed, bias, out=out)
        packed = None
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

    __slots__ = ("packed", "_tried", "lm_head", "glu")

    def __init__(self, lm_head: bool = False, glu: bool = False):
        self.lm_head, self.glu = lm_head, glu
        self.drop()

    def drop(self) -> None:
        self.packed, self._tried = None, False

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if not self._tried:
            self.packed, self._tried = pack(weight, self.lm_head, self.glu), True
        return self.packed


class PackedLinear(nn.Linear):
    """nn.Linear whose forward uses a prepacked copy of its weight (made lazily, dropped by `unpack`).

    `batch_invariant` (set by the model in deterministic mode) routes it through the fixed-tile
    Triton GEMM instead, whose rows do not depend on the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_weight = LazyPacked()
        self.glu_weight = LazyPacked(glu=True)    # packed only if silu_mul is called
        self.batch_invariant = False

    def unpack(self) -> None:
        self.packed_weight.drop()
        self.glu_weight.drop()

    def _epilogue_ok(self, x: torch.Tensor) -> bool:
        """Whether the fused epilogues may take x: float32 on the CPU, not batch-invariant mode, and
        not a tensor the layer's Triton kernels take (CUDA, or the tests' FORCE on CPU tensors)."""
        return (not self.batch_invariant and x.dtype == torch.float32 and x.device.type == "cpu"
                and not triton_ops.usable(x))

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """residual + x . w^T (+ bias) [m, n] for a 2-D x, from one float32 GEMM whose sums start
        from the residual, where our float32 GEMM applies; else None (the caller adds)."""
        if not self._epilogue_ok(x) or x.dim() != 2 or residual.dtype != torch.float32 or residual.stride(-1) != 1:
            return None
        packed = self.packed_weight.get(self.weight)
        if not isinstance(packed, Fp32Panels) or tuple(residual.shape) != (x.shape[0], packed.n):
            return None
        return gemm_f32(x, packed, self.bias, residual=residual)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a gated MLP's gate|up projection (gate rows first): silu(gate) * up [..., n / 2] from
        one float32 GEMM with the activation in its epilogue, where our float32 GEMM applies (a
        float32 CPU x, n % 32 == 0); else None (the caller runs forward and its own SiLU*up)."""
        if not self._epilogue_ok(x):
            return None
        packed = self.glu_weight.get(self.weight)
        return None if packed is None else gemm_f32(x, packed, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and x.dim() == 2:
            return triton_ops.batch_invariant_linear(x, self.weight, self.bias)
        return linear(x, self.packed_weight.get(self.weight), self.weight, self.bias)
