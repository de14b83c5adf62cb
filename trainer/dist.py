"""torchrun / DDP helpers: process group from torchrun's environment, device choice, collectives.

One process per rank; `torchrun --nproc_per_node N` (or several nodes with c10d rendezvous) sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and `init_distributed` joins the group:
gloo on CPU, nccl on GPU. Without those variables everything is a no-op single process, so the
same training script runs both ways. Every collective here is called by all ranks in the same
order (the training loop is lock-step), never from one rank alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ---- collectives (identity when single-process) ----
    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor (same shape on all ranks) along dim 0, rank-major."""
        if not self.enabled:
            return t
        x = t.to(self.device).contiguous()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        tdist.all_gather(out, x)
        return torch.cat(out, 0).to(t.device)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self.enabled:
            return t
        x = t.to(self.device).clone()
        tdist.all_reduce(x, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX,
                                "min": tdist.ReduceOp.MIN}[op])
        return x.to(t.device)

    def reduce_metrics(self, metrics: dict, max_keys=(), min_keys=()) -> dict:
        """Mean over ranks of every float metric (ranks hold equally many rows), max / min for
        the named keys. One all_reduce per kind, keys in sorted order on every rank."""
        if not self.enabled:
            return dict(metrics)
        out = dict(metrics)
        groups = {"max": [k for k in sorted(metrics) if k in max_keys],
                  "min": [k for k in sorted(metrics) if k in min_keys]}
        groups["sum"] = [k for k in sorted(metrics) if k not in max_keys and k not in min_keys]
        for op, keys in groups.items():
            if not keys:
                continue
            vals = self.all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), op)
            if op == "sum":
                vals = vals / self.world_size
            out.update({k: float(v) for k, v in zip(keys, vals.tolist())})
        return out

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]


def init_distributed() -> DistInfo:
    """Join the torchrun process group when launched by torchrun; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world <= 1:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if cuda else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local, device, backend)


def shutdown(info: DistInfo) -> None:
    if info.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
