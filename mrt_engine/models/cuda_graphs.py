"""Piecewise CUDA graphs for decode steps: everything between two attentions replays as one graph.

On the first lent H200 the fork phase kept the GPU busy 23% of the time: a decode step of an
8B model launched ~900 kernels, one by one from Python. Here a decode-only step of N rows runs at
a bucket size B >= N (a power of two): piece 0 (embedding, RoPE tables, layer 0's norm, qkv GEMM
and RoPE), then per layer the attention, eager (its plan changes every step: groups, chunks, grid
sizes), and one piece holding the rest of that layer and the next layer's pre-attention half. A
piece is captured once per bucket (lazily, at its first step) and replayed after that, so a layer
costs one graph launch plus the attention's few instead of ~15-28 launches.

Rows N..B are padding: each piece's ops are row-wise, so padding rows never reach real ones, and the
attention reads and writes rows [0, N) only. Inputs (token ids, positions) are copied into the
bucket's static buffers; every piece's outputs are static tensors the next piece reads.

`MRT_CUDA_GRAPHS`: "1" captures on CUDA (off by default until a GPU run has measured it), "eager"
runs the same pieces without capturing on any device (what the CPU tests check), anything else off.
The graphs hold the weights' addresses: `LlamaModel.load_weights` writes weights in place, so
`LLM.update_weights` keeps them valid; anything that re-allocates parameters must `reset()`.
"""
from __future__ import annotations

import os

import torch

ENV = "MRT_CUDA_GRAPHS"
MAX_BUCKET = 512


def mode_from_env() -> str | None:
    """'capture', 'eager' or None (off), from MRT_CUDA_GRAPHS."""
    raw = os.environ.get(ENV, "0").strip().lower()
    return {"1": "capture", "eager": "eager"}.get(raw)


def bucket_of(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class _Bucket:
    """Static buffers and the captured pieces for steps of up to `size` decode rows."""

    def __init__(self, model, size: int):
        spec, dev, dt = model.spec, model.device, model.dtype
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(size, dtype=torch.int64, device=dev)
        self.attn_out = [torch.zeros(size, spec.num_heads, spec.head_dim, dtype=dt, device=dev)
                         for _ in range(spec.num_layers)]
        self.graphs: list = []       # one torch.cuda.CUDAGraph per piece (capture mode)
        self.outputs: list = []      # each piece's static outputs


class PiecewiseDecode:
    def __init__(self, model, mode: str):
        if mode not in ("capture", "eager"):
            raise ValueError(f"mode must be 'capture' or 'eager', got {mode!r}")
        if mode == "capture" and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model = model
        self.mode = mode
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None
        self.replays = 0             # decode steps served (tests and benchmarks read it)

    def reset(self) -> None:
        """Drops every captured graph and static buffer (after weights are re-allocated)."""
        self.buckets.clear()
        self.pool = None

    def eligible(self, input_ids: torch.Tensor, meta) -> bool:
        return meta.num_prefill_tokens == 0 and 0 < input_ids.shape[0] <= MAX_BUCKET

    # the pieces: plain functions of static inputs, so capture and eager run the same code --------
    def _first(self, ids, positions):
        m = self.model
        h = m.embed_tokens(ids)
        cos, sin = m.rope.cos_sin(positions, h.dtype)
        return (h, cos, sin) + m.layers[0].pre_attention(h, cos, sin)

    def _middle(self, i, o, h, cos, sin):
        layers = self.model.layers
        h = layers[i].post_attention(o, h)
        return (h,) + layers[i + 1].pre_attention(h, cos, sin)

    def _last(self, o, h):
        return (self.model.layers[-1].post_attention(o, h),)

    def _pieces(self, bk: _Bucket):
        """(function, inputs) of every piece in order; inputs may name earlier pieces' outputs."""
        n_layers = len(self.model.layers)
        out = bk.outputs
        pieces = [(self._first, lambda: (bk.input_ids, bk.positions))]
        for i in range(n_layers - 1):
            pieces.append((lambda o, h, c, s, i=i: self._middle(i, o, h, c, s),
                           lambda i=i: (bk.attn_out[i], out[i][0], out[0][1], out[0][2])))
        pieces.append((self._last, lambda: (bk.attn_out[-1], out[n_layers - 1][0])))
        return pieces

    def _capture(self, bk: _Bucket) -> None:
        # each piece warmed up on a side stream (Triton compiles, cuBLAS picks its kernels), then
        # captured into one memory pool; outputs stay referenced, so no later piece reuses them
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for fn, inputs in self._pieces(bk):
            args = inputs()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outs = fn(*args)
            bk.graphs.append(graph)
            bk.outputs.append(outs)

    def _bucket(self, n: int) -> _Bucket:
        size = bucket_of(n)
        bk = self.buckets.get(size)
        if bk is None:
            bk = self.buckets[size] = _Bucket(self.model, size)
            if self.mode == "capture":
                self._capture(bk)
        return bk

    def forward(self, input_ids: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        """A decode-only step (see eligible) -> hidden states [N, H], as LlamaModel.forward."""
        n = input_ids.shape[0]
        bk = self._bucket(n)
        bk.input_ids[:n].copy_(input_ids)
        bk.positions[:n].copy_(meta.positions)
        backend, scale = self.model.attn_backend, self.model.spec.scale
        takes_out = getattr(backend, "accepts_out", False)   # else one copy into the static buffer
        # eager: the piece functions run afresh; capture: their graphs replay (no per-step closures)
        pieces = self._pieces(bk) if self.mode == "eager" else None
        if pieces:
            bk.outputs.clear()
        last = len(self.model.layers)
        for i in range(last + 1):
            if pieces:
                fn, inputs = pieces[i]
                bk.outputs.append(fn(*inputs()))
            else:
                bk.graphs[i].replay()
            if i == last:
                break
            q, k, v = bk.outputs[i][-3:]
            k_cache, v_cache = kv_caches[i]
            o = bk.attn_out[i][:n]
            if takes_out:
                backend.forward(q[:n], k[:n], v[:n], k_cache, v_cache, meta, scale, out=o)
            else:
                o.copy_(backend.forward(q[:n], k[:n], v[:n], k_cache, v_cache, meta, scale))
        self.replays += 1
        return bk.outputs[-1][0][:n]
