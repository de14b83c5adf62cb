"""KV bookkeeping benchmark: one fork-heavy MRT-style operation trace replayed through the C++ core
and through its pure-Python twin; prints ops/s of each and the ratio, writes JSON.

The trace (seeded, generated once by running it on the twin so every call is valid):
1. prompts: T traces, each a shared system prompt + its own question; prefix-cache lookup,
   prefill of the rest, cache_sequence;
2. generation: L decode steps, one batched append_decode over all traces per step;
3. MRT forks, per trace: at each of B episode boundaries fork the trace, append a forced
   "time is up" suffix, look the boundary prefix up in the cache, fork K branches from it; decode
   all B*K branches of the trace S steps (batched, copies drained each step); release them;
4. cache and release the traces; new requests sharing the system prompts hit the prefix cache.

Every API call is one op. Both replays are checked to return identical results before timing.

    python benchmarks/bench_kv_cache.py            # 64 traces x 16 boundaries x 8 forks
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mrt_engine.kv import core_py as kv_core_py  # noqa: E402

BLOCK_SIZE = 16


def make_trace(traces=64, boundaries=16, forks=8, decode_steps=448, branch_steps=16,
               suffix_len=8, seed=0):
    """Returns (num_blocks, [(method_name, args), ...]) for a pool that never runs dry."""
    rng = random.Random(seed)
    vocab = 32000
    system = [[rng.randrange(vocab) for _ in range(48)] for _ in range(4)]
    suffix = [rng.randrange(vocab) for _ in range(suffix_len)]
    per_trace = (48 + 32 + decode_steps) // BLOCK_SIZE + 2
    per_fork = boundaries * (1 + forks) * ((suffix_len + branch_steps) // BLOCK_SIZE + 2)
    num_blocks = traces * per_trace + per_fork + 256
    sim = kv_core_py.KVCacheManager(num_blocks, BLOCK_SIZE)
    ops = []

    def call(name, *args):
        ops.append((name, args))
        return getattr(sim, name)(*args)

    # 1. prompts
    tids = list(range(traces))
    for t in tids:
        prompt = system[t % 4] + [rng.randrange(vocab) for _ in range(rng.randint(16, 32))]
        hit = call("add_sequence", t, prompt)
        call("append_tokens", t, prompt[hit:])
        call("cache_sequence", t)
    # 2. generation
    for _ in range(decode_steps):
        call("append_decode", tids, [rng.randrange(vocab) for _ in tids])
        call("take_copies")
    # 3. forks at episode boundaries
    next_id = traces
    for t in tids:
        n = sim.num_tokens(t)
        lo = n - decode_steps
        positions = sorted(rng.sample(range(lo, n), boundaries))
        parents, branches = [], []
        for pos in positions:
            b = next_id
            next_id += 1
            call("fork", t, b, pos)
            call("append_tokens", b, suffix)
            call("match_prefix", sim.token_ids(b), 0)
            parents.append(b)
            for _ in range(forks):
                call("fork", b, next_id, pos + suffix_len)
                branches.append(next_id)
                next_id += 1
        for _ in range(branch_steps):
            call("append_decode", branches, [rng.randrange(vocab) for _ in branches])
            call("take_copies")
        for s in branches + parents:
            call("free_sequence", s)
    # 4. release traces, then new requests reuse the cached system prompts
    for t in tids:
        call("cache_sequence", t)
        call("free_sequence", t)
    for k in range(traces):
        prompt = system[k % 4] + [rng.randrange(vocab) for _ in range(24)]
        hit = call("add_sequence", next_id, prompt)
        call("append_tokens", next_id, prompt[hit:])
        call("free_sequence", next_id)
        next_id += 1
    call("clear_prefix_cache")
    assert sim.num_free_blocks() == num_blocks
    return num_blocks, ops


def replay(cls, num_blocks, ops, record=False):
    """Replays ops on a fresh manager; returns (seconds, results or None). Bound methods are
    resolved before the clock starts, so the loop measures the calls themselves; the cyclic GC
    is off while timing (as in timeit), else its passes over the trace itself dominate."""
    m = cls(num_blocks, BLOCK_SIZE)
    calls = [(getattr(m, name), args) for name, args in ops]
    if record:
        return 0.0, [f(*a) for f, a in calls]
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for f, a in calls:
            f(*a)
        return time.perf_counter() - t0, None
    finally:
        gc.enable()


def _norm(x):
    return [_norm(v) for v in x] if isinstance(x, (list, tuple)) else x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=int, default=64)
    ap.add_argument("--boundaries", type=int, default=16)
    ap.add_argument("--forks", type=int, default=8)
    ap.add_argument("--decode-steps", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3, help="timed replays per backend (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "kv_cache.json"))
    args = ap.parse_args(argv)
    try:
        from mrt_engine import _C
    except ImportError:
        sys.exit("mrt_engine._C is not built: pip install -e . --no-build-isolation")

    t0 = time.perf_counter()
    num_blocks, ops = make_trace(args.traces, args.boundaries, args.forks, args.decode_steps,
                                 seed=args.seed)
    gen_s = time.perf_counter() - t0
    counts = {}
    for name, _ in ops:
        counts[name] = counts.get(name, 0) + 1
    print(f"workload: {args.traces} traces x {args.boundaries} boundaries x {args.forks} forks, "
          f"{args.decode_steps} decode steps, block_size {BLOCK_SIZE}, {num_blocks} blocks: "
          f"{len(ops)} ops ({gen_s:.1f}s to generate)")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {platform.system()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"machine: {machine}, python {platform.python_version()}, load average {load}")

    # identical results first (also the warm-up of both backends)
    _, want = replay(kv_core_py.KVCacheManager, num_blocks, ops, record=True)
    _, got = replay(_C.KVCacheManager, num_blocks, ops, record=True)
    assert _norm(want) == _norm(got), "C++ and Python replays differ"

    best = {}
    for name, cls in (("python", kv_core_py.KVCacheManager), ("cpp", _C.KVCacheManager)):
        best[name] = min(replay(cls, num_blocks, ops)[0] for _ in range(args.repeats))
        print(f"{name:>6}: {best[name]:.3f} s  {len(ops) / best[name]:,.0f} ops/s")
    ratio = best["python"] / best["cpp"]
    print(f"C++ core is {ratio:.1f}x the Python twin ({len(ops)} ops, best of {args.repeats})")

    result = {
        "benchmark": "kv_cache", "workload": {
            "traces": args.traces, "boundaries": args.boundaries, "forks": args.forks,
            "decode_steps": args.decode_steps, "block_size": BLOCK_SIZE, "num_blocks": num_blocks,
            "seed": args.seed, "ops": len(ops), "op_counts": counts},
        "machine": machine, "python": platform.python_version(), "load_average_1min": load,
        "repeats": args.repeats, "timing": "wall clock, best of repeats, cyclic GC off",
        "python_s": best["python"], "cpp_s": best["cpp"],
        "python_ops_per_s": len(ops) / best["python"], "cpp_ops_per_s": len(ops) / best["cpp"],
        "ratio": ratio,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
