"""Launch tuning knobs of the attention kernels, read from the environment at every launch.

- MRT_KERNEL_NUM_STAGES (default 2): software-pipelining depth of the K/V loop (`num_stages` of
  the paged_decode, cascade_decode and extend launches). Deeper keeps more K/V tiles in flight
  (shared memory permitting: 2 x BLOCK_N x Dh x 2 bytes per stage for bf16).
- MRT_KERNEL_PROGRAMS_PER_SM (default 4): split-K / chunk sizing aims at this many programs per SM
  of the current device (132 SMs assumed without CUDA, i.e. the H100/H200 count), so long ranges
  spread over the whole GPU without cutting them finer than the kernels' minimum split. 4, not 2:
  on the first lent H200 (benchmarks/results/gpu_h200/bench_kernels.json, Llama-8B attention,
  P=8K, B=16, CUDA-graph replays) the sweep gave cascade 0.184 ms at 4 vs 0.221 ms at 2 (0.192 at 1)
  and the tree cascade 0.141 vs 0.151 ms, with 2 the slowest at both pipelining depths tried;
  per-sequence paged decode did not move. One shape, one run each: re-check with each GPU run.

Read per launch (an environment lookup costs ~1 us) so benchmarks/gpu_check.sh can sweep both in
one process; Triton caches one compiled kernel per num_stages value. Deterministic mode does not
use the programs target (its chunks are fixed), so these knobs never change its results.
"""
from __future__ import annotations

import functools
import os

NUM_STAGES_ENV = "MRT_KERNEL_NUM_STAGES"
PROGRAMS_PER_SM_ENV = "MRT_KERNEL_PROGRAMS_PER_SM"
DEFAULT_NUM_STAGES = 2
DEFAULT_PROGRAMS_PER_SM = 4
DEFAULT_SMS = 132


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def num_stages() -> int:
    """Pipelining depth for the attention kernels' K/V loops."""
    return _positive_int(NUM_STAGES_ENV, DEFAULT_NUM_STAGES)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    import torch

    if device_index < 0 or not torch.cuda.is_available():
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device=None) -> int:
    """Programs a split-K / chunked launch should aim for: programs-per-SM x SMs of `device`."""
    index = -1
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
    return _positive_int(PROGRAMS_PER_SM_ENV, DEFAULT_PROGRAMS_PER_SM) * _sm_count(index)
