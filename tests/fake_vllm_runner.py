"""Stands in for `<vllm-python> vllm_fork_runner.py JOB RESULT` in tests (no vLLM on CI): speaks
the interleave protocol of vllm_baseline.VllmSession, or runs the one-shot mode, with made-up
walls. FAKE_VLLM_FAIL=rep makes it die at the first repetition, FAKE_VLLM_FAIL=start before READY.
FAKE_VLLM_SPIN=S busy-loops S seconds after each answer, as vLLM polls after each batch.
FAKE_VLLM_CHILD=PATH starts a child process (as vLLM starts its engine core) and writes its pid to
PATH."""
import json
import os
import sys
import time

MARK = "@@MRT "


def spin():
    end = time.perf_counter() + float(os.environ.get("FAKE_VLLM_SPIN", "0"))
    while time.perf_counter() < end:
        pass


def main() -> int:
    _runner, job_path, res_path = sys.argv[1:4]
    with open(job_path) as f:
        job = json.load(f)
    fail = os.environ.get("FAKE_VLLM_FAIL", "")
    print("INFO vllm-like noise on stdout", flush=True)
    if fail == "start":
        print("fake startup failure", file=sys.stderr)
        return 3
    child_file = os.environ.get("FAKE_VLLM_CHILD")
    if child_file:
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(child_file, "w") as f:
            f.write(str(child.pid))
    n = len(job["traces"]) * len(job["positions"]) * job["branches"]

    def write_result(walls):
        with open(res_path, "w") as f:
            json.dump({"walls_s": walls, "gen_tokens": n * job["answer_len"], "prefill_tokens": None,
                       "vllm": "fake", "logprobs": bool(job.get("logprobs", False))}, f)

    if not job.get("interleave"):   # one-shot: every repetition now, walls 0.25, 0.5, ...
        write_result([0.25 * (i + 1) for i in range(len(job["suffixes"]))])
        return 0
    print(MARK + "READY", flush=True)
    spin()
    walls, pending = [], list(job["suffixes"])
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "end":
            break
        if fail == "rep":
            print("fake failure mid-run", file=sys.stderr)
            return 5
        pending.pop(0)
        walls.append(0.25 * (len(walls) + 1))
        print(MARK + f"WALL {walls[-1]!r}", flush=True)
        spin()
    write_result(walls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
