"""Per-step metrics: output_dir/metrics.jsonl (always), tensorboard (report_to=tensorboard, when
installed), and the loud warnings that catch silent no-learning runs.

One JSON object per line, `step` first. A resumed run truncates the file to the steps its
checkpoint covers, so a run and its resumed twin write the same lines.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from typing import Optional

METRICS_FILE = "metrics.jsonl"
TRUNCATION_WARN = 0.5    # most completions hit max_completion_length: reward ~0, nothing learns
ZERO_STD_WARN = 0.5      # most groups have no reward spread: their advantages are all 0


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)    # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsLogger:
    def __init__(self, output_dir: str, report_to: str = "none", enabled: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            truncate(self.path, resume_step)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("report_to=tensorboard but tensorboard is not installed "
                              "(pip install tensorboard); writing metrics.jsonl only")
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate(path: str, last_step: int) -> None:
    """Keep only the lines with step <= last_step (a crashed run may have logged past its last
    checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(rows)


def read(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file (a run folder is accepted too)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path!r} (expected RUN_DIR/{METRICS_FILE})")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def health_warnings(m: dict) -> list[str]:
    """The loud warnings a step's metrics call for (empty when healthy)."""
    out = []
    tr = m.get("truncated_ratio", 0.0)
    if tr > TRUNCATION_WARN:
        out.append(f"{tr:.0%} of completions hit max_completion_length: their reward is likely 0 "
                   "and GRPO learns nothing from them; raise max_completion_length")
    groups = m.get("num_groups", 0)
    if groups and m.get("zero_std_groups", 0) / groups > ZERO_STD_WARN:
        out.append(f"{m['zero_std_groups']:.0f} of {groups:.0f} groups have zero reward spread: their "
                   "advantages are 0; the task may be too easy/hard or num_generations too small")
    for k in ("loss", "grad_norm"):
        v = m.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            out.append(f"{k} is {v}")
    return out


def warn_loudly(step: int, messages: list[str]) -> None:
    for msg in messages:
        print(f"\n!!! WARNING step {step}: {msg}", file=sys.stderr, flush=True)
