"""Kernel benchmark (GPU): shared-prefix decode attention, cascade vs per-sequence vs torch SDPA.

Workload (DESIGN.md §2): G groups (fork boundaries) x B branches; each group shares a P-token
prefix, each branch has s private tokens. Llama-8B attention shapes: 32 query heads, 8 KV heads,
head_dim 128, bf16, block size 16. One decode step of one layer (kv_store, cascade/paged partials,
merge; the step plan is built once per step and shared by all layers, so it is built in the
warm-up, as the engine does on its first layer), for
  cascade      TritonAttentionBackend with the sharing groups (shared blocks read once per group)
  cascade_det  the same in deterministic mode (fixed 256-token chunks, one tile shape)
  paged        TritonAttentionBackend with every row alone (per-sequence split-K paged decode)
  sdpa         torch SDPA over dense per-sequence K/V (what a non-paged engine reads)
and the tree workload (the G groups fork ONE P-token trace at evenly spaced boundaries):
  tree_cascade / tree_paged   the trunk read once per step (prefix-tree segments) vs per row

Timing: each call is captured once in a CUDA graph and replayed, so the figure is device time, not
Python launch overhead (`ms`, the headline); `eager_ms` is the same call launched from Python.
Before every timed rep the L2 cache is flushed (a buffer of max(256 MiB, 4 x L2) is zeroed outside
the timed events), so even P = 1K working sets are read from HBM. Medians over the reps.
Effective bandwidth = unique KV bytes (G * (P + B*s) tokens) / graph time, against a device-to-device
copy bandwidth (read + write bytes / time) measured in the same run.

`--sweep` times cascade and paged at one large configuration for every (num_stages,
programs-per-SM) pair given (environment knobs of mrt_engine/kernels/tuning.py), in one process.
Prints one headline line and writes JSON to $OUT/bench_kernels.json (when OUT is set) and
benchmarks/results/.

    python benchmarks/bench_kernels.py             # P = 1K/4K/8K/16K, G = 8, B = 4/16, s = 64
    python benchmarks/bench_kernels.py --quick     # one small configuration
    python benchmarks/bench_kernels.py --sweep --sweep-stages 2 3 4 --sweep-programs 1 2 4
On a machine without CUDA it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HQ, HKV, DH, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


_FLUSH: dict = {}


def _l2_flush():
    """Zero a buffer much larger than L2 so the next kernel reads its working set from HBM."""
    if "buf" not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
        _FLUSH["buf"] = torch.empty(max(256 << 20, 4 * l2), dtype=torch.uint8, device="cuda")
    _FLUSH["buf"].zero_()


def _timed_reps(launch, reps: int, flush: bool) -> float:
    """Median device time (ms) of `launch()` between two events, L2 flushed before each rep."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        if flush:
            _l2_flush()
        start.record()
        launch()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def time_call(fn, iters: int, warmup: int = 3, flush: bool = True) -> dict:
    """{"ms": CUDA-graph replay time, "eager_ms": Python-launched time} (medians, cold L2).

    The warm-up runs on a side stream (as graph capture requires) and compiles the kernels and
    builds the step plan; a call that cannot be captured reports its eager time with `graph_error`.
    On CPU (the tests' smoke run) both are one wall-clock average.
    """
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / iters
        return {"ms": ms, "eager_ms": ms}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    out = {"eager_ms": _timed_reps(fn, iters, flush)}
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        out["ms"] = _timed_reps(graph.replay, iters, flush)
        del graph
    except Exception as exc:   # keep the eager figure, say why there is no graph one
        torch.cuda.synchronize()
        out["ms"] = out["eager_ms"]
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_call(lambda: dst.copy_(src), iters=10, flush=False)["ms"]
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
                             group_num_shared_host=ns, decode_context_lens_host=lens,
                             group_rows_host=list(range(D)), decode_block_tables_host=tables)
    return meta, nxt


def _record(times: dict, nbytes: int, copy_gbps: float) -> dict:
    gbps = nbytes / (times["ms"] * 1e-3) / 1e9
    rec = {"ms": round(times["ms"], 4), "eager_ms": round(times["eager_ms"], 4), "effective_gbps": round(gbps, 1),
           "fraction_of_copy_bw": round(gbps / copy_gbps, 3)}
    if "graph_error" in times:
        rec["graph_error"] = times["graph_error"]
    return rec


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
        out[name] = _record(time_call(fn, iters), unique_bytes, copy_gbps)
    out["speedup_cascade_vs_paged"] = round(out["paged"]["ms"] / out["cascade"]["ms"], 2)
    # the tree workload: the G groups fork one trace, so its trunk can be read once per step
    tree_fns = {"tree_cascade": lambda: fast.forward(q, k, v, k_cache, v_cache, meta_tree, scale),
                "tree_paged": lambda: fast.forward(q, k, v, k_cache, v_cache, meta_tree_rows, scale)}
    tree_bytes = 2 * (P + D * s) * hkv * dh * esize
    out["tree_unique_kv_bytes"] = tree_bytes
    for name, fn in tree_fns.items():
        out[name] = _record(time_call(fn, iters), tree_bytes, copy_gbps)
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


def sweep(G, B, P, s, iters, copy_gbps, stages, programs_per_sm, *, device="cuda", hq=HQ, hkv=HKV, dh=DH, bs=BS,
          dtype=DTYPE) -> dict:
    """cascade / paged / tree_cascade graph times for every (num_stages, programs-per-SM) pair.

    The knobs are environment variables read at every launch (mrt_engine/kernels/tuning.py), so one
    process covers the grid; metadata is rebuilt per pair because split sizes follow the target.
    """
    from mrt_engine.attention.triton_backend import TritonAttentionBackend
    from mrt_engine.kernels.tuning import NUM_STAGES_ENV, PROGRAMS_PER_SM_ENV

    saved = {k: os.environ.get(k) for k in (NUM_STAGES_ENV, PROGRAMS_PER_SM_ENV)}
    meta_sh, group_blocks = _meta(G, B, P, s, True, device, bs)
    _, num_blocks = _meta(G, B, P, s, True, device, bs, tree=True, offset=group_blocks)
    torch.manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, hkv, dh, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    D = G * B
    q = torch.randn(D, hq, dh, dtype=dtype, device=device)
    k, v = torch.randn(D, hkv, dh, dtype=dtype, device=device), torch.randn(D, hkv, dh, dtype=dtype, device=device)
    scale, esize = dh ** -0.5, k_cache.element_size()
    unique_bytes = 2 * G * (P + B * s) * hkv * dh * esize
    tree_bytes = 2 * (P + D * s) * hkv * dh * esize
    fast = TritonAttentionBackend(deterministic=False)
    rows = []
    try:
        for ns in stages:
            for pps in programs_per_sm:
                os.environ[NUM_STAGES_ENV], os.environ[PROGRAMS_PER_SM_ENV] = str(ns), str(pps)
                metas = {"cascade": (_meta(G, B, P, s, True, device, bs)[0], unique_bytes),
                         "paged": (_meta(G, B, P, s, False, device, bs)[0], unique_bytes),
                         "tree_cascade": (_meta(G, B, P, s, True, device, bs, tree=True, offset=group_blocks)[0],
                                          tree_bytes)}
                row = {"num_stages": ns, "programs_per_sm": pps}
                for name, (meta, nbytes) in metas.items():
                    try:
                        call = lambda m=meta: fast.forward(q, k, v, k_cache, v_cache, m, scale)  # noqa: E731
                        row[name] = _record(time_call(call, iters), nbytes, copy_gbps)
                    except Exception as exc:   # e.g. too many stages for shared memory: record, go on
                        row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                rows.append(row)
                print("sweep " + "  ".join(
                    f"{k}={v}" if not isinstance(v, dict) else f"{k} {v.get('ms', float('nan')):.3f} ms"
                    for k, v in row.items()), flush=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    best = {}
    for name in ("cascade", "paged", "tree_cascade"):
        ok = [r for r in rows if "ms" in r[name]]
        if ok:
            b = min(ok, key=lambda r: r[name]["ms"])
            best[name] = {"num_stages": b["num_stages"], "programs_per_sm": b["programs_per_sm"], "ms": b[name]["ms"]}
    return {"G": G, "B": B, "P": P, "s": s, "rows": rows, "best": best}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small configuration")
    ap.add_argument("--prefixes", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--branches", type=int, nargs="*", default=[4, 16])
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20, help="timed reps per method (median)")
    ap.add_argument("--sweep", action="store_true", help="also sweep num_stages x programs-per-SM")
    ap.add_argument("--sweep-stages", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--sweep-programs", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--sweep-prefix", type=int, default=8192)
    ap.add_argument("--sweep-branches", type=int, default=16)
    ap.add_argument("--skip-main", action="store_true", help="only the sweep")
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
    for P in ([] if args.skip_main else args.prefixes):
        for B in args.branches:
            r = run_config(args.groups, B, P, args.suffix, args.iters, copy_gbps, check=(P == args.prefixes[0]))
            results.append(r)
            dump()
            line = "  ".join(f"{m} {r[m]['ms']:.3f} ms ({r[m]['effective_gbps']:.0f} GB/s)"
                             for m in ("cascade", "cascade_det", "paged", "sdpa") if m in r)
            print(f"P={P:>5} G={args.groups} B={B:>2} s={args.suffix}: {line}  "
                  f"cascade/paged {r['speedup_cascade_vs_paged']:.2f}x  tree: cascade {r['tree_cascade']['ms']:.3f} ms"
                  f" vs paged {r['tree_paged']['ms']:.3f} ms ({r['speedup_tree_cascade_vs_paged']:.2f}x)", flush=True)
    if results:
        head = next((r for r in results if r["P"] == 8192 and r["B"] == 16), results[-1])
        report["headline"] = {
            "P": head["P"], "B": head["B"], "speedup_cascade_vs_paged": head["speedup_cascade_vs_paged"],
            "cascade_fraction_of_copy_bw": head["cascade"]["fraction_of_copy_bw"],
            "cascade_graph_ms": head["cascade"]["ms"], "cascade_eager_ms": head["cascade"]["eager_ms"],
            "bar_met": head["speedup_cascade_vs_paged"] >= 5 and head["cascade"]["fraction_of_copy_bw"] >= 0.6,
        }
        dump()
        print(f"cascade vs per-sequence decode at P={head['P']}, B={head['B']}: "
              f"{head['speedup_cascade_vs_paged']:.2f}x, "
              f"cascade at {100 * head['cascade']['fraction_of_copy_bw']:.0f}% of copy bandwidth "
              f"({copy_gbps:.0f} GB/s); graph {head['cascade']['ms']:.3f} ms vs eager "
              f"{head['cascade']['eager_ms']:.3f} ms", flush=True)
    if args.sweep:
        report["sweep"] = sweep(args.groups, args.sweep_branches, args.sweep_prefix, args.suffix, args.iters,
                                copy_gbps, args.sweep_stages, args.sweep_programs)
        dump()
        print(f"sweep best: {json.dumps(report['sweep']['best'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
