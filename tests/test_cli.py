"""The `mrt` console script: status 0 on success whatever a delegated command returns, and bad
input as one `mrt: error:` line with status 2 (no traceback)."""
from __future__ import annotations

import sys

import pytest

from mrt_engine import cli


def test_console_exits_0_when_a_delegated_command_returns_a_value(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or {"final_step": 3})
    assert cli.console() is None   # the entry point's sys.exit(None) is status 0
    assert calls == [None]


@pytest.mark.parametrize("argv,expect", [
    (["eval", "--data", "/nonexistent/problems.jsonl", "--out", "unused"], "no such data file"),
    (["train", "--betaa", "3"], "did you mean beta"),
])
def test_console_reports_bad_input_in_one_line(monkeypatch, capsys, argv, expect):
    monkeypatch.delenv("MRT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["mrt", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.console()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mrt: error: ") and expect in err and "Traceback" not in err
