"""Per-step time breakdown of the engine, off by default (issue 11, item 2).

When enabled, named sections record their EXCLUSIVE wall time (a nested section's time is taken
out of its parent), so the categories of one step add up to the time measured around it:

    from mrt_engine import profiling
    profiling.enable(model)        # also hooks the model's Linear / RMSNorm / decoder layers
    ... run steps ...
    profiling.report()             # {category: {"s": seconds, "calls": n}}
    profiling.disable()

Categories: gemm (every nn.Linear of the layers), gemm_lm_head, norm (RMSNorm incl. its own
casts), layer_other (RoPE, SiLU*up, residual adds: a layer's time minus its children),
attn_store / attn_plan / attn_own / attn_shared / attn_merge / attn_prefill (torch backend;
attn_decode = the C++ CPU kernel's own + shared + merge in one call),
cast (explicit bf16<->fp32 copies outside the norm), sampler, prompt_logprobs (vLLM's, at every
prompt position of the requests that ask), step_build (integer step tensors
and sampling inputs), kv_copy (fork tail / copy-on-write block copies), embed, runner_other
(the rest of ModelRunner.execute).

The attention probe (`probe_attention`) is separate: it times each CPU decode-attention call of the
lean decode step and then runs the same call again at once, so the first time is the call as the
step met it (its K/V and scratch wherever the layers before left them) and the second the same
work with its data in cache. The difference is what the call waits on memory. It doubles that
attention's work, so it runs in its own repetition, never in a timed or a profiled one.

Off, a section is one global read and a shared no-op context manager, and the model carries no
hooks, so the normal path pays (almost) nothing. CPU ops are synchronous, so wall time around an
op is its cost; on CUDA the numbers would need a synchronize and are not meaningful as is.
"""
from __future__ import annotations

import time

__all__ = ["enable", "disable", "enabled", "reset", "report", "section", "probe_attention", "probed",
           "attention_probe_report"]


class _Off:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_OFF = _Off()


class _Profiler:
    def __init__(self):
        self.on = False
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[list] = []      # [name, start, time spent in children]
        self.hooks: list = []

    def push(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        name, start, child = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] = self.totals.get(name, 0.0) + elapsed - child
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.stack:
            self.stack[-1][2] += elapsed


_P = _Profiler()


class _Section:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _P.push(self.name)

    def __exit__(self, *exc):
        _P.pop()
        return False


def section(name: str):
    """A context manager timing `name` (exclusive time) when profiling is on; a no-op otherwise."""
    return _Section(name) if _P.on else _OFF


def enabled() -> bool:
    return _P.on


def _hook_pair(module, name: str):
    def pre(mod, args):
        _P.push(name)

    def post(mod, args, out):
        _P.pop()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def enable(model=None) -> None:
    """Turns profiling on; with `model` (our LlamaModel), hooks its layers, Linear and RMSNorm
    modules so their time is attributed without any check in their forward."""
    import torch

    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module (the engine's model), got {type(model).__name__}")
    disable()
    _P.on = True
    reset()
    if model is None:
        return
    from mrt_engine.models.llama import DecoderLayer, RMSNorm

    for mod in model.modules():
        if isinstance(mod, DecoderLayer):
            _P.hooks += _hook_pair(mod, "layer_other")
        elif isinstance(mod, torch.nn.Linear):
            _P.hooks += _hook_pair(mod, "gemm")
        elif isinstance(mod, RMSNorm):
            _P.hooks += _hook_pair(mod, "norm")
        elif isinstance(mod, torch.nn.Embedding):
            _P.hooks += _hook_pair(mod, "embed")


def disable() -> None:
    _P.on = False
    for h in _P.hooks:
        h.remove()
    _P.hooks = []
    _P.stack = []


def reset() -> None:
    _P.totals, _P.calls, _P.stack = {}, {}, []


def report() -> dict[str, dict]:
    """{category: {"s": exclusive seconds, "calls": count}}, largest first."""
    return {k: {"s": round(v, 4), "calls": _P.calls[k]}
            for k, v in sorted(_P.totals.items(), key=lambda kv: -kv[1])}


class _AttentionProbe:
    def __init__(self):
        self.on = False
        self.first = self.again = 0.0
        self.calls = 0


_PROBE = _AttentionProbe()


def probe_attention(on: bool = True) -> None:
    """Turns the attention probe on (totals reset) or off (see the module docstring)."""
    _PROBE.on = bool(on)
    _PROBE.first = _PROBE.again = 0.0
    _PROBE.calls = 0


def probed(run):
    """`run` (a decode-attention plan's run) itself, or while the probe is on a wrapper that times
    it, runs it again with the same arguments and times that too. A run writes its output from its
    inputs alone, so the second leaves the same result."""
    if not _PROBE.on:
        return run

    def twice(*args):
        t0 = time.perf_counter()
        run(*args)
        t1 = time.perf_counter()
        run(*args)
        t2 = time.perf_counter()
        _PROBE.first += t1 - t0
        _PROBE.again += t2 - t1
        _PROBE.calls += 1

    return twice


def attention_probe_report() -> dict:
    """{"calls", "in_place_s", "again_at_once_s"} since `probe_attention(True)`."""
    return {"calls": _PROBE.calls, "in_place_s": round(_PROBE.first, 6), "again_at_once_s": round(_PROBE.again, 6)}
