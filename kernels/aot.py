"""Ahead-of-time compile of every kernel for real GPUs, with no GPU present.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32))` runs the
whole compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas), so code that the interpreter
accepts but a GPU compile rejects (dot shapes, layouts, shared memory, unsupported ops) fails here.
Configurations are the ones the engine launches (the launchers' *_config functions), for the
dtypes, head dims and GQA groups of the models we serve (Llama-8B: bf16, Dh 128, group 4), with the
argument divisibility Triton's JIT specializes at those launches (`divisibility_attrs`), and for
the Llama-8B shape also the deeper pipelines gpu_check.sh sweeps (Hopper).

Must run WITHOUT the interpreter: `TRITON_INTERPRET=0 python -m mrt_engine.kernels.aot [caps...]`
prints one JSON line per compile and exits non-zero if any failed.
"""
from __future__ import annotations

import json
import sys
import time

import torch
import triton

TL_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SWEEP_STAGES = (3, 4)
# dynamic shared memory one block may use (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _signature(kernel, pointers: dict, floats=(), constexprs: dict = None) -> dict:
    """Every parameter's type: pointers as given, floats fp32, other runtime ints i32, constexprs marked."""
    sig = {}
    for name, is_const in zip(kernel.arg_names, (p.is_constexpr for p in kernel.params)):
        if is_const:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            raise KeyError(f"{kernel.__name__}: no pointer type given for {name}")
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def configurations():
    """(label, kernel, signature, constexprs) for every compile."""
    from mrt_engine.kernels.cascade_decode import cascade_decode_config, cascade_decode_kernel
    from mrt_engine.kernels.extend import extend_config, extend_kernel
    from mrt_engine.kernels.kv_store import kv_store_config, kv_store_kernel
    from mrt_engine.kernels.merge import merge_config, merge_kernel
    from mrt_engine.kernels.paged_decode import paged_decode_config, paged_decode_kernel

    i64, f32 = "*i64", "*fp32"
    # (dtype, head_dim, GQA group, Hkv, kernels): the Llama-8B serving shape gets everything; the
    # other shapes cover fp16, head_dim 64, group 8, and the fp32 (FMA, no tensor core) paths
    shapes = [(torch.bfloat16, 128, 4, 8, ("kv_store", "paged_decode", "cascade_decode", "extend", "merge")),
              (torch.float16, 64, 8, 2, ("paged_decode", "cascade_decode", "extend")),
              (torch.float32, 64, 1, 2, ("paged_decode", "cascade_decode", "extend"))]
    out = {}
    for dtype, dh, group, hkv, names in shapes:
        t = "*" + TL_TYPE[dtype]
        tag = f"{TL_TYPE[dtype]}-d{dh}-g{group}"
        if "kv_store" in names:
            out[f"kv_store-{tag}"] = (kv_store_kernel, _signature(kv_store_kernel, dict(
                k_ptr=t, v_ptr=t, k_cache_ptr=t, v_cache_ptr=t, slot_ptr=i64)), kv_store_config(hkv, dh))
        out[f"paged_decode-{tag}"] = (paged_decode_kernel, _signature(paged_decode_kernel, dict(
            q_ptr=t, k_cache_ptr=t, v_cache_ptr=t, block_tables_ptr=i64, kv_start_ptr=i64, kv_end_ptr=i64,
            o_ptr=f32, lse_ptr=f32), floats=("scale_log2",)), paged_decode_config(dtype, dh, group))
        casc_sig = _signature(cascade_decode_kernel, dict(
            q_ptr=t, k_cache_ptr=t, v_cache_ptr=t, block_tables_ptr=i64, group_ptr_ptr=i64, group_rows_ptr=i64,
            range_start_ptr=i64, range_end_ptr=i64, slot_base_ptr=i64, o_ptr=f32, lse_ptr=f32),
            floats=("scale_log2",))
        # query tiles: a group's smallest (16 rows), a full 64-row tile (16 branches x group 4), deterministic mode
        for rows, absolute in ((1, False), (16, False), (16, True)):
            cfg = cascade_decode_config(dtype, dh, group, rows, absolute=absolute)
            out[f"cascade_decode-{tag}-m{cfg['BLOCK_M']}{'-abs' if absolute else ''}"] = (
                cascade_decode_kernel, casc_sig, cfg)
        out[f"extend-{tag}"] = (extend_kernel, _signature(extend_kernel, dict(
            q_ptr=t, k_cache_ptr=t, v_cache_ptr=t, o_ptr=t, block_tables_ptr=i64, q_start_ptr=i64,
            num_new_ptr=i64, context_lens_ptr=i64), floats=("scale_log2",)), extend_config(dtype, dh, group))
        if dtype == torch.bfloat16:
            # deeper pipelines for the sweep of benchmarks/gpu_check.sh (MRT_KERNEL_NUM_STAGES): the
            # decode kernels the benchmark times, Hopper only (the lent GPU), so their shared memory
            # is known to fit before a GPU minute is spent on them
            for stages in SWEEP_STAGES:
                out[f"paged_decode-{tag}-s{stages}"] = out[f"paged_decode-{tag}"] + (stages,)
                wide = cascade_decode_config(dtype, dh, group, 16)
                out[f"cascade_decode-{tag}-m{wide['BLOCK_M']}-s{stages}"] = (cascade_decode_kernel, casc_sig, wide,
                                                                            stages)
        if "merge" in names:
            out[f"merge-{tag}"] = (merge_kernel, _signature(merge_kernel, dict(
                o_parts_ptr=f32, lse_parts_ptr=f32, out_ptr=t, out_lse_ptr=f32)), merge_config(dh))
    # the decoder layer's fused elementwise ops (CUDA path of mrt_engine/models/llama.py)
    from mrt_engine.kernels.rms_norm import rms_norm_config, rms_norm_kernel
    from mrt_engine.kernels.rope import rope_config, rope_kernel
    from mrt_engine.kernels.silu_mul import silu_mul_config, silu_mul_kernel

    for dtype, hidden, heads, dh in ((torch.bfloat16, 4096, 40, 128), (torch.float16, 896, 16, 64),
                                     (torch.float32, 896, 16, 64)):
        t = "*" + TL_TYPE[dtype]
        tag = f"{TL_TYPE[dtype]}-h{hidden}"
        out[f"rms_norm-{tag}"] = (rms_norm_kernel, _signature(rms_norm_kernel, dict(x_ptr=t, w_ptr=t, out_ptr=t),
                                                              floats=("eps",)), rms_norm_config(dtype, hidden))
        out[f"silu_mul-{tag}"] = (silu_mul_kernel, _signature(silu_mul_kernel, dict(x_ptr=t, out_ptr=t)),
                                  silu_mul_config())
        out[f"rope-{TL_TYPE[dtype]}-d{dh}-h{heads}"] = (
            rope_kernel, _signature(rope_kernel, dict(x_ptr=t, cos_ptr=t, sin_ptr=t)), rope_config(heads, dh))
    # deterministic mode's fixed-tile GEMM (every layer linear and the LM head), with and without bias
    from mrt_engine.kernels.matmul import matmul_config, matmul_kernel

    for dtype, bias in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False), (torch.float32, True)):
        t = "*" + TL_TYPE[dtype]
        out[f"matmul-{TL_TYPE[dtype]}{'-bias' if bias else ''}"] = (
            matmul_kernel, _signature(matmul_kernel, dict(x_ptr=t, w_ptr=t, b_ptr=t, out_ptr=t)),
            matmul_config(dtype, has_bias=bias))
    # (label, kernel, signature, constexprs, num_stages): the engine's default depth unless given
    return [(label, *rest) if len(rest) == 4 else (label, *rest, 2) for label, rest in out.items()]


# integer arguments the engine's launches pass as multiples of 16 (strides of tensors whose inner
# dim is head_dim, the block size, split/chunk sizes); lse strides and block-table rows need not be,
# nor a GEMM's row strides (K and N are any size)
_NOT_DIVISIBLE = ("stride_lr", "stride_lh", "stride_ls", "stride_olr", "stride_olh", "stride_btr", "stride_btp",
                  "stride_xm", "stride_wn", "stride_om")


def divisibility_attrs(kernel, signature: dict) -> dict:
    """What Triton's JIT specializes at launch: 16-byte aligned pointers and ints divisible by 16.

    Without it the compiler cannot vectorise the K/V loads or turn them into cp.async copies, so
    the software pipeline (num_stages) would be absent here although the GPU compile has it.
    """
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        kind = signature[name]
        if kind == "constexpr":
            continue
        if kind.startswith("*") or (kind == "i32" and name not in _NOT_DIVISIBLE and (
                name.startswith("stride_") or name in ("block_size", "split_size", "chunk_size"))):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_one(kernel, signature: dict, constexprs: dict, cap: int, num_stages: int = 2):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                    attrs=divisibility_attrs(kernel, signature))
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options=dict(num_warps=1 if kernel.__name__ in ("kv_store_kernel", "merge_kernel") else 4,
                                       num_stages=num_stages))


def main(argv) -> int:
    from triton.runtime.jit import JITFunction

    caps = [int(a) for a in argv] or [80, 90]
    failed = 0
    for label, kernel, sig, consts, stages in configurations():
        if not isinstance(kernel, JITFunction):
            print(json.dumps({"error": "kernels are interpreted: run with TRITON_INTERPRET=0"}))
            return 2
        for cap in caps:
            if stages != 2 and cap != 90:
                continue
            t0 = time.time()
            rec = {"kernel": label, "cap": cap, "triton": triton.__version__, "num_stages": stages,
                   "shared_limit": SHARED_LIMIT.get(cap)}
            try:
                compiled = compile_one(kernel, sig, consts, cap, stages)
                ptx = compiled.asm["ptx"]
                rec.update(ok=True, seconds=round(time.time() - t0, 2), cubin_bytes=len(compiled.asm["cubin"]),
                           mma="wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none"),
                           pipelined="cp.async" in ptx,
                           shared=compiled.metadata.shared)
            except Exception as exc:   # report every failure, then fail at the end
                failed += 1
                rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
            print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
