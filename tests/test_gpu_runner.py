"""tests/gpu_runner.run_tests: every kind of test outcome is recorded, none ends the run.

On the first lent H200 a test calling pytest.xfail ended the runner with a traceback (pytest's
outcome exceptions are BaseExceptions), so the file's later tests never ran.
"""
import json

import pytest

from gpu_runner import Skipped, run_tests


def _namespace():
    def test_passes():
        pass

    def test_pytest_skip():
        pytest.skip("no widget")

    def test_own_skip():
        raise Skipped("no gadget")

    def test_xfail():
        pytest.xfail("known gap")

    def test_pytest_fail():
        pytest.fail("bad value")

    def test_error():
        raise ValueError("one is not two")

    def test_last():     # runs although everything above raised
        pass

    return {n: f for n, f in locals().items() if n.startswith("test_")} | {"__file__": "x/test_fake.py"}


def _run(namespace, **kw):
    # a test outcome escaping run_tests would be taken by THIS pytest run as this test's own
    # outcome (a skip or an xfail instead of a failure), so catch it and fail
    try:
        return run_tests(namespace, **kw)
    except BaseException as exc:
        raise AssertionError(f"run_tests let {type(exc).__name__} escape: {exc}") from None


def test_every_outcome_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    report = tmp_path / "r.jsonl"
    monkeypatch.setenv("MRT_TEST_REPORT", str(report))
    rc = _run(_namespace())
    records = [json.loads(line) for line in report.read_text().splitlines()]
    got = {r["test"]: (r["status"], r["detail"]) for r in records}
    assert got == {
        "test_passes": ("passed", ""),
        "test_pytest_skip": ("skipped", "no widget"),
        "test_own_skip": ("skipped", "no gadget"),
        "test_xfail": ("xfailed", "known gap"),
        "test_pytest_fail": ("failed", "Failed: bad value"),
        "test_error": ("failed", "ValueError: one is not two"),
        "test_last": ("passed", ""),
    }
    assert all(r["file"] == "test_fake.py" for r in records)
    assert rc == 1
    assert "2 passed, 2 skipped, 1 xfailed, 2 failed" in capsys.readouterr().out


def test_no_failure_returns_zero(monkeypatch):
    monkeypatch.delenv("MRT_TEST_REPORT", raising=False)
    ns = _namespace()
    assert _run({k: ns[k] for k in ("test_passes", "test_xfail", "test_pytest_skip")}) == 0


def test_interrupt_is_not_a_test_result(monkeypatch):
    monkeypatch.delenv("MRT_TEST_REPORT", raising=False)

    def test_interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tests({"test_interrupted": test_interrupted})


def test_only_if_skips_the_whole_file(monkeypatch):
    monkeypatch.delenv("MRT_TEST_REPORT", raising=False)
    calls = []
    assert _run({"test_a": lambda: calls.append(1)}, only_if=lambda: "no device") == 0
    assert calls == []
