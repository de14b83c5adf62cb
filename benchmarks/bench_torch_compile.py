"""Weighs torch.compile for the CPU decode step (issue 11's "compiling the decode step" lever).

Each decoder layer's two halves around attention (RMSNorm, qkv GEMM and RoPE; o_proj, residual,
RMSNorm, gate_up, SiLU * up, down, residual) are written in plain PyTorch and compiled with inductor
(CPU, `freezing` on, so weights are constants it may prepack); attention stays our C++ kernel, as in
the piecewise CUDA graphs. Whole fork calls of `bench_branched.py`'s workload then alternate between
the engine's own eager path (oneDNN-prepacked GEMMs, fused C++ RMSNorm / SiLU * up / RoPE) and the
compiled halves in one process; compile time and warm-up are reported apart.

    python benchmarks/bench_torch_compile.py --dtype float32 --rounds 6
    python benchmarks/bench_torch_compile.py --dtype bfloat16 --static     # one graph per row count
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine_forks import _check_and_release, _fork_call, predicted_blocks  # noqa: E402
from workload import SHAPES, Workload, machine_info, random_model, random_traces, suffix_ids  # noqa: E402

from mrt_engine import LLM, SamplingParams  # noqa: E402
from mrt_engine.models import llama  # noqa: E402


def _rms_norm(x, norm):
    # transformers' order: normalise in float32, cast back, scale in the model dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


class PreAttention(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h, cos, sin):
        layer, s, n = self.layer, self.layer.spec, h.shape[0]
        qkv = F.linear(_rms_norm(h, layer.input_layernorm), layer.qkv_proj.weight, layer.qkv_proj.bias)
        qk = qkv[:, :layer.q_size + layer.kv_size].view(n, s.num_heads + s.num_kv_heads, s.head_dim)
        qk = llama.apply_rope(qk, cos, sin)
        v = qkv[:, layer.q_size + layer.kv_size:].view(n, s.num_kv_heads, s.head_dim)
        return qk[:, :s.num_heads], qk[:, s.num_heads:], v


class PostAttention(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, o, h):
        layer, n = self.layer, o.shape[0]
        h = F.linear(o.reshape(n, layer.q_size), layer.o_proj.weight, layer.o_proj.bias) + h
        gate, up = F.linear(_rms_norm(h, layer.post_attention_layernorm), layer.gate_up_proj.weight,
                            layer.gate_up_proj.bias).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down_proj.weight, layer.down_proj.bias) + h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--trace-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=6, help="alternated pairs of fork calls")
    ap.add_argument("--static", action="store_true", help="dynamic=False (a graph per row count)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    w = Workload(trace_len=args.trace_len)
    shape = SHAPES[args.shape]
    vocab = shape.vocab
    llm = LLM(random_model(shape), num_blocks=int(predicted_blocks(w, 16, True, "fork") * 1.5) + 64,
              dtype=args.dtype, device="cpu", block_size=16, seed=w.seed, max_num_seqs=256)
    outs = llm.generate([t[:-1] for t in random_traces(w, vocab)],
                        [SamplingParams(max_tokens=1, ignore_eos=True, seed=i) for i in range(w.traces)], keep=True)
    handles = [o.outputs[0].handle for o in outs]

    def fork_call(rep):
        _check_and_release(llm, _fork_call(llm, handles, w, suffix_ids(w, vocab, rep), 1000 + rep), w, w.traces)

    eager = (llama.DecoderLayer.pre_attention, llama.DecoderLayer.post_attention)
    halves = {id(layer): (torch.compile(PreAttention(layer), dynamic=not args.static),
                          torch.compile(PostAttention(layer), dynamic=not args.static))
              for layer in llm.model.layers}

    def use(mode):
        if mode == "compiled":
            llama.DecoderLayer.pre_attention = lambda self, h, cos, sin: halves[id(self)][0](h, cos, sin)
            llama.DecoderLayer.post_attention = lambda self, o, h: halves[id(self)][1](o, h)
        else:
            llama.DecoderLayer.pre_attention, llama.DecoderLayer.post_attention = eager

    try:
        use("eager")
        fork_call(-1)
        t0 = time.perf_counter()
        use("compiled")
        fork_call(-2)
        fork_call(-3)
        compile_s = time.perf_counter() - t0
        walls = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for mode in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                use(mode)
                t0 = time.perf_counter()
                fork_call(r)
                walls[mode].append(time.perf_counter() - t0)
    finally:
        use("eager")
    ratios = [e / c for e, c in zip(walls["eager"], walls["compiled"])]
    result = dict(workload=dict(shape=args.shape, dtype=args.dtype, trace_len=args.trace_len, traces=w.traces,
                                forks=w.traces * w.positions, branches=w.branches, answer_len=w.answer_len),
                  machine=machine_info(), torch=torch.__version__, dynamic=not args.static,
                  compile_and_two_warmup_calls_s=round(compile_s, 2),
                  eager_s=[round(x, 4) for x in walls["eager"]], compiled_s=[round(x, 4) for x in walls["compiled"]],
                  eager_over_compiled_per_round=[round(x, 3) for x in ratios],
                  eager_over_compiled_median=round(statistics.median(ratios), 3))
    print(f"workload: {args.shape} {args.dtype}, {w.traces} traces x {args.trace_len} tokens, "
          f"{w.traces * w.positions} forks x {w.branches} branches x {w.answer_len} tokens; "
          f"{result['machine'].get('cpu')}, torch {torch.__version__}, dynamic={not args.static}")
    print(f"compile + 2 warm-up calls: {compile_s:.1f} s")
    print(f"fork call: eager {statistics.median(walls['eager']):.3f} s, compiled "
          f"{statistics.median(walls['compiled']):.3f} s; eager/compiled per round "
          + " ".join(f"{x:.3f}" for x in ratios) + f", median {result['eager_over_compiled_median']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
