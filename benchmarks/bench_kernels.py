"""Kernel benchmark (GPU): shared-prefix decode attention, cascade vs per-sequence vs torch SDPA.

Workload (DESIGN.md §2): G groups (fork boundaries) x B branches; each group shares a P-token
prefix, each branch has s private tokens. Llama-8B attention shapes: 32 query heads, 8 KV heads,
head_dim 128, bf16, block size 16. One decode step of one layer, timed with CUDA events after a
warm-up, for
  cascade      TritonAttentionBackend with the sharing groups (shared blocks read once per group)
  cascade_det  the same in deterministic mode (fixed 256-token chunks, one tile shape)
  paged        TritonAttentionBackend with every row alone (per-sequence split-K paged decode)
  sdpa         torch SDPA over dense per-sequence K/V (what a non-paged engine reads)
and the tree workload (the G groups fork ONE P-token trace at evenly spaced boundaries):
  tree_cascade / tree_paged   the trunk read once per step (prefix-tree segments) vs per row
Effective bandwidth = unique KV bytes (G * (P + B*s) tokens) / time, against a device-to-device
copy bandwidth (read + write bytes / time) measured in the same run. Prints one headline line and
writes JSON to $OUT/bench_kernels.json (when OUT is set) and benchmarks/results/.

    python benchmarks/bench_kernels.py             # P = 1K/4K/8K/16K, G = 8, B = 4/16, s = 64
    python benchmarks/bench_kernels.py --quick     # one small configuration
On a machine without CUDA it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HQ, HKV, DH, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


def _time_ms(fn, iters: int, warmup: int = 3) -> float:
    if not torch.cuda.is_available():          # CPU smoke run (tests): one untimed-quality pass
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _meta(G, B, P, s, share: bool, device, bs=BS, tree=False, offset=0):
    """Decode metadata; each row owns ceil(s/bs) blocks after its group's shared ones.

    Groups (default): group g's rows share their own P-token prefix, blocks [g*P/bs, (g+1)*P/bs).
    Tree: all groups fork ONE P-token trace, group g at boundary (g+1)*P/G, so they share its trunk.
    Block ids start at `offset`; returns (meta, first free block id).
    """
    from mrt_engine.attention.metadata import AttentionMetadata

    nsh, nown = P // bs, -(-s // bs)
    shared_blocks = [(g + 1) * nsh // G if tree else nsh for g in range(G)]
    tables, slots, lens = [], [], []
    nxt = offset + (nsh if tree else G * nsh)
    for g in range(G):
        first = offset + (0 if tree else g * nsh)
        for _ in range(B):
            table = list(range(first, first + shared_blocks[g])) + list(range(nxt, nxt + nown))
            nxt += nown
            tables.append(table)
            ctx = shared_blocks[g] * bs + s
            lens.append(ctx)
            slots.append(table[(ctx - 1) // bs] * bs + (ctx - 1) % bs)
    D = G * B
    width = max(len(t) for t in tables)
    tables = [t + [0] * (width - len(t)) for t in tables]
    if share:
        ptr, ns = [g * B for g in range(G + 1)], shared_blocks
    else:
        ptr, ns = list(range(D + 1)), [0] * D
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    meta = AttentionMetadata(slot_mapping=t(slots), positions=t([n - 1 for n in lens]), num_prefill_tokens=0,
                             decode_block_tables=t(tables), decode_context_lens=t(lens), group_ptr=t(ptr),
                             group_rows=t(list(range(D))), group_num_shared=t(ns), group_ptr_host=ptr,
                             group_num_shared_host=ns)
    return meta, nxt


def run_config(G, B, P, s, iters, copy_gbps, check=False, *, device="cuda", hq=HQ, hkv=HKV, dh=DH, bs=BS,
               dtype=DTYPE):
    from mrt_engine.attention.triton_backend import TritonAttentionBackend

    dev = device
    D = G * B
    meta_sh, group_blocks = _meta(G, B, P, s, True, dev, bs)
    # the tree workload lives in blocks after the groups' so the two never overwrite each other
    meta_tree, num_blocks = _meta(G, B, P, s, True, dev, bs, tree=True, offset=group_blocks)
    meta_tree_rows, _ = _meta(G, B, P, s, False, dev, bs, tree=True, offset=group_blocks)
    meta_rows, _ = _meta(G, B, P, s, False, dev, bs)
    meta_det, _ = _meta(G, B, P, s, True, dev, bs)
    torch.manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, hkv, dh, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(D, hq, dh, dtype=dtype, device=dev)
    k = torch.randn(D, hkv, dh, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    scale = dh ** -0.5
    fast, det = TritonAttentionBackend(deterministic=False), TritonAttentionBackend(deterministic=True)
    fns = {
        "cascade": lambda: fast.forward(q, k, v, k_cache, v_cache, meta_sh, scale),
        "cascade_det": lambda: det.forward(q, k, v, k_cache, v_cache, meta_det, scale),
        "paged": lambda: fast.forward(q, k, v, k_cache, v_cache, meta_rows, scale),
    }
    # dense per-sequence K/V (each branch its own copy, as a non-paged engine holds it)
    esize = k_cache.element_size()
    kv_dense_bytes = 2 * D * (P + s) * hkv * dh * esize
    if dev == "cpu" or kv_dense_bytes < 0.5 * torch.cuda.mem_get_info()[0]:
        # after one forward, so the rows' current tokens are in the cache as well
        fns["paged"]()
        rows = meta_rows.decode_block_tables                       # [D, nblocks]
        kd = k_cache[rows].view(D, -1, hkv, dh)[:, :P + s].transpose(1, 2).contiguous()   # [D, Hkv, L, Dh]
        vd = v_cache[rows].view(D, -1, hkv, dh)[:, :P + s].transpose(1, 2).contiguous()
        qd = q[:, :, None, :]                                       # [D, Hq, 1, Dh]
        fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=scale,
                                                                               enable_gqa=True)
    unique_bytes = 2 * G * (P + B * s) * hkv * dh * esize
    per_seq_bytes = 2 * D * (P + s) * hkv * dh * esize
    out = {"G": G, "B": B, "P": P, "s": s, "unique_kv_bytes": unique_bytes, "per_sequence_kv_bytes": per_seq_bytes}
    for name, fn in fns.items():
        ms = _time_ms(fn, iters)
        gbps = unique_bytes / (ms * 1e-3) / 1e9
        out[name] = {"ms": round(ms, 4), "effective_gbps": round(gbps, 1),
                     "fraction_of_copy_bw": round(gbps / copy_gbps, 3)}
    out["speedup_cascade_vs_paged"] = round(out["paged"]["ms"] / out["cascade"]["ms"], 2)
    # the tree workload: the G groups fork one trace, so its trunk can be read once per step
    tree_fns = {"tree_cascade": lambda: fast.forward(q, k, v, k_cache, v_cache, meta_tree, scale),
                "tree_paged": lambda: fast.forward(q, k, v, k_cache, v_cache, meta_tree_rows, scale)}
    tree_bytes = 2 * (P + D * s) * hkv * dh * esize
    out["tree_unique_kv_bytes"] = tree_bytes
    for name, fn in tree_fns.items():
        ms = _time_ms(fn, iters)
        gbps = tree_bytes / (ms * 1e-3) / 1e9
        out[name] = {"ms": round(ms, 4), "effective_gbps": round(gbps, 1),
                     "fraction_of_copy_bw": round(gbps / copy_gbps, 3)}
    out["speedup_tree_cascade_vs_paged"] = round(out["tree_paged"]["ms"] / out["tree_cascade"]["ms"], 2)
    if "sdpa" in out:
        out["speedup_cascade_vs_sdpa"] = round(out["sdpa"]["ms"] / out["cascade"]["ms"], 2)
    if check:
        a, b, c = fns["cascade"](), fns["paged"](), fns["cascade_det"]()
        out["max_abs_diff_cascade_vs_paged"] = float((a.float() - b.float()).abs().max())
        out["max_abs_diff_det_vs_paged"] = float((c.float() - b.float()).abs().max())
        out["max_abs_diff_tree_vs_paged"] = float((tree_fns["tree_cascade"]().float()
                                                   - tree_fns["tree_paged"]().float()).abs().max())
        if "sdpa" in fns:
            out["max_abs_diff_cascade_vs_sdpa"] = float((a.float() - fns["sdpa"]()[:, :, 0].float()).abs().max())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small configuration")
    ap.add_argument("--prefixes", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--branches", type=int, nargs="*", default=[4, 16])
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; this benchmark needs a GPU (nothing to do).")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton

    if args.quick:
        args.prefixes, args.branches, args.iters = [1024], [4], 5
    t0 = time.time()
    copy_gbps = copy_bandwidth_gbps()
    report = {
        "benchmark": "bench_kernels", "device": torch.cuda.get_device_name(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_gbps": round(copy_gbps, 1),
        "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": DH, "block_size": BS, "dtype": str(DTYPE)},
        "results": [],
    }
    os.makedirs(args.results_dir, exist_ok=True)
    name = "bench_kernels_" + torch.cuda.get_device_name().replace(" ", "_").lower() + ".json"
    paths = [os.path.join(args.results_dir, name)]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "bench_kernels.json"))

    def dump():   # after every configuration, so a run cut short still leaves its results
        report["seconds"] = round(time.time() - t0, 1)
        for p in paths:
            with open(p, "w") as f:
                json.dump(report, f, indent=1)

    results = report["results"]
    for P in args.prefixes:
        for B in args.branches:
            r = run_config(args.groups, B, P, args.suffix, args.iters, copy_gbps, check=(P == args.prefixes[0]))
            results.append(r)
            dump()
            line = "  ".join(f"{m} {r[m]['ms']:.3f} ms ({r[m]['effective_gbps']:.0f} GB/s)"
                             for m in ("cascade", "cascade_det", "paged", "sdpa") if m in r)
            print(f"P={P:>5} G={args.groups} B={B:>2} s={args.suffix}: {line}  "
                  f"cascade/paged {r['speedup_cascade_vs_paged']:.2f}x  tree: cascade {r['tree_cascade']['ms']:.3f} ms"
                  f" vs paged {r['tree_paged']['ms']:.3f} ms ({r['speedup_tree_cascade_vs_paged']:.2f}x)", flush=True)
    head = next((r for r in results if r["P"] == 8192 and r["B"] == 16), results[-1])
    report["headline"] = {
        "P": head["P"], "B": head["B"], "speedup_cascade_vs_paged": head["speedup_cascade_vs_paged"],
        "cascade_fraction_of_copy_bw": head["cascade"]["fraction_of_copy_bw"],
        "bar_met": head["speedup_cascade_vs_paged"] >= 5 and head["cascade"]["fraction_of_copy_bw"] >= 0.6,
    }
    dump()
    print(f"cascade vs per-sequence decode at P={head['P']}, B={head['B']}: {head['speedup_cascade_vs_paged']:.2f}x, "
          f"cascade at {100 * head['cascade']['fraction_of_copy_bw']:.0f}% of copy bandwidth "
          f"({copy_gbps:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
