"""A CPU decode step with no per-op Python between the kernels (float32 and bf16 models).

`DecoderLayer.forward` is the reference: per layer it makes ~40 PyTorch calls besides its kernels
(views, fresh outputs, argument checks, module calls). In a fork call of the small benchmark model
that Python took ~430 us per layer (~3 ms of a ~52 ms step), and it runs with cold CPU caches: the
kernels before it have streamed the weights and the KV cache through them. This path checks once
per step that every kernel applies, makes the step's buffers once, and then calls the same
kernels, layer after layer: RMSNorm, RoPE, the KV store and the step's decode-attention plan (C++,
on raw pointers), and the projections: float32, our GEMM (bias, and the residual add or SiLU*up in
its epilogue); bf16, the layers' own `PackedLinear.forward` (oneDNN), the residual `add_` and
the C++ SiLU*up. The kernels, their inputs and their order are the reference's, so the hidden
states are bit-identical (tests/test_cpu_decode.py); float32's residual adds write into the step's
hidden buffer in place (the GEMM reads each output tile's residual before writing it), where the
reference makes new tensors.

Taken for decode-only steps (no prefill rows) on a CPU where all of those kernels apply; anything
else (CUDA, deterministic mode, a prefill in the step, a kernel switched off by its environment
variable) runs the reference path. `MRT_ENGINE_LEAN_DECODE=0` turns it off.
"""
from __future__ import annotations

import os

import torch

from mrt_engine import profiling
from mrt_engine.attention import cpu_kernel
from mrt_engine.models import cpu_ops, triton_ops
from mrt_engine.models.packed_linear import Fp32Panels
from mrt_engine.profiling import section

ENV = "MRT_ENGINE_LEAN_DECODE"


def _panels(lin, glu: bool = False):
    """The layer's float32 GEMM panels (glu: the gate|up pair for SiLU*up), or None."""
    packed = (lin.glu_weight if glu else lin.packed_weight).get(lin.weight)
    return packed if isinstance(packed, Fp32Panels) and packed.glu == glu else None


def _bias(lin, panels: Fp32Panels) -> torch.Tensor | None:
    b = panels.bias_for(lin.bias)
    return None if b is None else b.contiguous()


class _LayerArgs:
    """A layer's weights as the kernels take them (pointers; tensors kept alive here)."""

    __slots__ = ("ln1", "ln2", "qkv", "o", "gate_up", "down", "keep")

    def __init__(self, layer):
        p_qkv, p_o = _panels(layer.qkv_proj), _panels(layer.o_proj)
        p_gu, p_down = _panels(layer.gate_up_proj, glu=True), _panels(layer.down_proj)
        if None in (p_qkv, p_o, p_gu, p_down):
            raise LookupError("a projection is not on our float32 GEMM")
        self.ln1 = layer.input_layernorm.weight.data_ptr()
        self.ln2 = layer.post_attention_layernorm.weight.data_ptr()
        biases = [_bias(lin, p) for lin, p in ((layer.qkv_proj, p_qkv), (layer.o_proj, p_o),
                                               (layer.gate_up_proj, p_gu), (layer.down_proj, p_down))]
        self.keep = (p_qkv, p_o, p_gu, p_down, biases)   # what the pointers point into
        self.qkv, self.o, self.gate_up, self.down = (
            (p.data.data_ptr(), p.n, 0 if b is None else b.data_ptr())
            for p, b in zip((p_qkv, p_o, p_gu, p_down), biases))


def usable(model, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, kv_caches) -> bool:
    """Whether `forward` below applies to this step (see the module docstring): each kernel's own
    predicate, asked about tensors of the step's shapes (views without data)."""
    if os.environ.get(ENV, "1") == "0" or meta.num_prefill_tokens or not meta.num_decode:
        return False
    if h.dtype not in (torch.float32, torch.bfloat16) or h.device.type != "cpu" or h.dim() != 2 \
            or model.batch_invariant or triton_ops.usable(h) or not cpu_ops.usable(h, h.dtype):
        return False
    from mrt_engine.attention.torch_backend import TorchAttentionBackend

    if type(model.attn_backend) is not TorchAttentionBackend:
        return False
    s = model.spec
    n, hkv, dh = h.shape[0], s.num_kv_heads, s.head_dim
    k_cache = kv_caches[0][0]
    if not cpu_kernel.usable(h.new_empty(0, s.num_heads, dh), k_cache) \
            or not cpu_ops.rope_usable(h.new_empty(0, s.num_heads + hkv, dh), cos) \
            or not sin.is_contiguous() or sin.shape != cos.shape:     # what cpu_ops.rope asks of sin
        return False
    kv_rows = h.new_empty(hkv * dh).as_strided((n, hkv, dh), (0, dh, 1))   # rows as the store reads them
    # one attention plan serves every layer: their caches must have one shape
    return all(k.shape == k_cache.shape and cpu_kernel.store_usable(kv_rows, kv_rows, k, v, meta.slot_mapping)
               for k, v in kv_caches)


class _Step:
    """What both dtypes' layer loops read: shapes, the step's attention plan, RoPE tables, KV slots."""

    def __init__(self, model, h, cos, sin, meta, kv_caches):
        from mrt_engine.attention.torch_backend import cpu_decode_plan

        s = model.spec
        self.n, self.hid = h.shape
        self.hq, self.hkv, self.dh, self.inter = s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size
        self.q_size, self.kv_size = self.hq * self.dh, self.hkv * self.dh
        self.threads = torch.get_num_threads()
        self.eps, self.scale = float(s.rms_norm_eps), float(s.scale)
        k0 = kv_caches[0][0]
        with section("attn_plan"):
            self.run = profiling.probed(cpu_decode_plan(meta, self.n, self.hq, k0)._plan.run)
        self.cos_p, self.sin_p = cos.data_ptr(), sin.data_ptr()   # contiguous (rope_usable), alive in forward
        self.slots = meta.slot_mapping.data_ptr()
        self.total_slots = k0.shape[0] * k0.shape[1]


def forward(model, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, kv_caches) -> torch.Tensor | None:
    """The layers over h [N, H], as DecoderLayer.forward would; None (h untouched) where a
    projection is not on the expected GEMM."""
    if h.dtype == torch.bfloat16:
        return _forward_bf16(model, h, cos, sin, meta, kv_caches)
    return _forward_f32(model, h, cos, sin, meta, kv_caches)


def _forward_f32(model, h, cos, sin, meta, kv_caches):
    """float32: h is updated in place and returned."""
    from mrt_engine import _C

    try:
        layers = [_LayerArgs(layer) for layer in model.layers]
    except LookupError:
        return None
    st = _Step(model, h, cos, sin, meta, kv_caches)
    n, hid, hq, hkv, dh, inter = st.n, st.hid, st.hq, st.hkv, st.dh, st.inter
    q_size, kv_size, threads, eps = st.q_size, st.kv_size, st.threads, st.eps
    n_qkv = q_size + 2 * kv_size
    # the step's buffers, reused by every layer
    x = torch.empty(n, hid, dtype=torch.float32)
    qkv = torch.empty(n, n_qkv, dtype=torch.float32)
    qk = torch.empty(n, hq + hkv, dh, dtype=torch.float32)        # RoPE'd q | k
    att = torch.empty(n, q_size, dtype=torch.float32)
    act = torch.empty(n, inter, dtype=torch.float32)
    hp, xp, qkvp, qkp, attp, actp = (t.data_ptr() for t in (h, x, qkv, qk, att, act))
    f4 = 4
    k_ptr, k_stride = qkp + q_size * f4, (hq + hkv) * dh
    v_ptr = qkvp + (q_size + kv_size) * f4
    for a, (k_cache, v_cache) in zip(layers, kv_caches):
        kc, vc = k_cache.data_ptr(), v_cache.data_ptr()
        with section("norm"):
            _C.rms_norm(hp, hid, a.ln1, xp, hid, n, hid, eps, False, threads)
        with section("gemm"):
            _C.gemm_f32(xp, hid, n, hid, a.qkv[0], a.qkv[1], a.qkv[2], qkvp, n_qkv, threads, False, 0, 0)
        with section("layer_other"):
            _C.rope(qkvp, n_qkv, st.cos_p, st.sin_p, qkp, n, hq + hkv, dh, False, threads)
        with section("attn_store"):
            cpu_kernel._store(k_ptr, k_stride, v_ptr, n_qkv, kc, vc, st.slots, n, kv_size, f4, st.total_slots,
                              threads)
        with section("attn_decode"):
            st.run(qkp, (hq + hkv) * dh, dh, kc, vc, attp, 0, st.scale, threads, True, True, False)
        with section("gemm"):
            _C.gemm_f32(attp, q_size, n, q_size, a.o[0], a.o[1], a.o[2], hp, hid, threads, False, hp, hid)
        with section("norm"):
            _C.rms_norm(hp, hid, a.ln2, xp, hid, n, hid, eps, False, threads)
        with section("gemm"):
            _C.gemm_f32(xp, hid, n, hid, a.gate_up[0], a.gate_up[1], a.gate_up[2], actp, inter, threads, True, 0, 0)
        with section("gemm"):
            _C.gemm_f32(actp, inter, n, inter, a.down[0], a.down[1], a.down[2], hp, hid, threads, False, hp, hid)
    return h


def _forward_bf16(model, h, cos, sin, meta, kv_caches):
    """bf16: projections and residual adds as the reference makes them (new tensors)."""
    from mrt_engine import _C

    st = _Step(model, h, cos, sin, meta, kv_caches)
    n, hid, hq, hkv, dh, inter = st.n, st.hid, st.hq, st.hkv, st.dh, st.inter
    q_size, kv_size, threads, eps = st.q_size, st.kv_size, st.threads, st.eps
    x = torch.empty(n, hid, dtype=torch.bfloat16)
    qk = torch.empty(n, hq + hkv, dh, dtype=torch.bfloat16)       # RoPE'd q | k
    att = torch.empty(n, q_size, dtype=torch.bfloat16)
    act = torch.empty(n, inter, dtype=torch.bfloat16)
    xp, qkp, attp, actp = (t.data_ptr() for t in (x, qk, att, act))
    b2 = 2
    k_ptr, k_stride = qkp + q_size * b2, (hq + hkv) * dh
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
        kc, vc = k_cache.data_ptr(), v_cache.data_ptr()
        with section("norm"):
            _C.rms_norm(h.data_ptr(), h.stride(0), layer.input_layernorm.weight.data_ptr(), xp, hid, n, hid, eps,
                        True, threads)
        with section("gemm"):
            qkv = layer.qkv_proj.forward(x)
        qkvp, ld = qkv.data_ptr(), qkv.stride(0)
        with section("layer_other"):
            _C.rope(qkvp, ld, st.cos_p, st.sin_p, qkp, n, hq + hkv, dh, True, threads)
        with section("attn_store"):
            cpu_kernel._store(k_ptr, k_stride, qkvp + (q_size + kv_size) * b2, ld, kc, vc, st.slots, n, kv_size, b2,
                              st.total_slots, threads)
        with section("attn_decode"):
            st.run(qkp, (hq + hkv) * dh, dh, kc, vc, attp, 1, st.scale, threads, True, True, True)
        with section("gemm"):
            y = layer.o_proj.forward(att)
        with section("layer_other"):
            h = y.add_(h)
        with section("norm"):
            _C.rms_norm(h.data_ptr(), h.stride(0), layer.post_attention_layernorm.weight.data_ptr(), xp, hid, n,
                        hid, eps, True, threads)
        with section("gemm"):
            gu = layer.gate_up_proj.forward(x)
        with section("layer_other"):
            _C.silu_mul_bf16(gu.data_ptr(), gu.data_ptr() + inter * b2, gu.stride(0), actp, inter, n, inter, threads)
        with section("gemm"):
            y = layer.down_proj.forward(act)
        with section("layer_other"):
            h = y.add_(h)
    return h
