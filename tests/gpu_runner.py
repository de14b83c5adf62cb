"""Run a GPU test file with or without pytest: a lent GPU image may have only torch and Triton.

A test file imports `pytest` from here (None when it is missing), marks itself with `gpu_marks()`,
calls `skip(reason)` for a test that cannot run, and ends with
    if __name__ == "__main__": sys.exit(run_tests(globals()))
which calls every `test_*` function that takes no arguments, prints PASSED / SKIPPED / XFAILED /
FAILED per test (failures with their traceback) and a count line, and returns 1 if any failed; with
MRT_TEST_REPORT set it also appends one JSON line per test to that file as the test ends.
"""
from __future__ import annotations

import json
import os
import time
import traceback

try:
    import pytest
except ImportError:   # the GPU image may lack it; run_tests() below stands in for it
    pytest = None


REPORT_ENV = "MRT_TEST_REPORT"   # a file: run_tests() appends one JSON line per finished test


class Skipped(Exception):
    """A test that cannot run here (raised by skip() when pytest is absent)."""


def skip(reason: str):
    if pytest is not None:
        pytest.skip(reason)
    raise Skipped(reason)


def gpu_marks(needs_cuda: bool = True) -> list:
    """The module's pytestmark: `gpu`, and skip-without-CUDA when `needs_cuda`."""
    if pytest is None:
        return []
    import torch

    marks = [pytest.mark.gpu]
    if needs_cuda:
        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))
    return marks


def needs_cuda(fn):
    """Mark one test GPU-only: `gpu` + skip without CUDA under pytest, SKIPPED by run_tests()."""
    import torch

    if pytest is not None:
        fn = pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))
    fn.needs_cuda = True
    return fn


def missing_modules(*names: str) -> list[str]:
    """Which of `names` cannot be imported (optional dependencies of a test)."""
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


# pytest's outcome exceptions derive from BaseException, not Exception: pytest.skip / pytest.xfail /
# pytest.fail called by a test must be caught by name here, or one of them ends the whole run
_OUTCOMES = {"Skipped": "skipped", "XFailed": "xfailed", "Failed": "failed"}


def _outcome(exc: BaseException) -> str | None:
    """The status a test's exception means, or None for one that is no test outcome (re-raised)."""
    if isinstance(exc, Exception) and type(exc).__name__ not in _OUTCOMES:
        return "failed"
    return _OUTCOMES.get(type(exc).__name__)


def run_tests(namespace: dict, only_if=None) -> int:
    """Call the namespace's argument-free test_* functions in order; 0 if none failed.

    `only_if` (a callable returning None or a reason string) skips the whole file with that reason.
    """
    import torch

    reason = only_if() if only_if else None
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    records = []
    for name, fn in tests:
        t0 = time.time()
        why = reason or ("needs CUDA" if getattr(fn, "needs_cuda", False) and not torch.cuda.is_available() else None)
        try:
            if why:
                raise Skipped(why)
            fn()
            status, detail = "passed", ""
        except BaseException as exc:   # report every test, fail at the end
            status = _outcome(exc)
            if status is None:         # KeyboardInterrupt, SystemExit: not a test's result
                raise
            if status == "failed":
                detail = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            else:
                detail = str(exc)
        secs = round(time.time() - t0, 1)
        record = {"file": os.path.basename(namespace.get("__file__", "?")), "test": name, "status": status,
                  "seconds": secs, "detail": detail[:500]}
        records.append(record)
        print(f"{status.upper()} {name} ({secs}s){': ' + detail if detail else ''}", flush=True)
        report = os.environ.get(REPORT_ENV)
        if report:   # one line per test as it ends, so a run cut off by a timeout keeps what it did
            with open(report, "a") as f:
                f.write(json.dumps(record) + "\n")
    counts = {s: sum(r["status"] == s for r in records) for s in ("passed", "skipped", "xfailed", "failed")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    return 1 if counts["failed"] else 0
