"""`mrt plot RUN_DIR [--out FILE.png]`: the training curves of a run (metrics.jsonl) as one PNG.

One panel per metric group (reward / accuracy, held-out accuracy, loss, KL and clipping, lengths
and truncation, logprob mismatch, grad norm and LR, seconds per phase); metrics a run does not have
are skipped. Uses matplotlib's Agg backend, so it works without a display.
"""
from __future__ import annotations

import argparse
import math
import os

from mrt_engine.trainer.metrics import read

PANELS = [
    ("reward", ["reward", "accuracy", "reward_std"]),
    ("held-out accuracy", ["eval_accuracy"]),
    ("loss", ["loss"]),
    ("KL / clipping", ["kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high"]),
    ("completion length", ["completion_length_mean", "completion_length_max"]),
    ("truncation / zero-std", ["truncated_ratio", "zero_std_groups"]),
    ("logprob mismatch", ["logprob_mismatch_mean", "logprob_mismatch_max"]),
    ("entropy", ["entropy"]),
    ("grad norm", ["grad_norm"]),
    ("learning rate", ["lr"]),
    ("seconds per step", ["generate_s", "fork_s", "credit_s", "train_s", "weight_sync_s", "eval_s"]),
    ("MRT progress", ["progress_mean", "regret_mean"]),
]


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draw the curves of RUN_DIR/metrics.jsonl; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(run_dir)
    if not rows:
        raise ValueError(f"{run_dir!r}: metrics.jsonl is empty (no step finished yet)")
    panels = [(t, [k for k in keys if _series(rows, k)[0]]) for t, keys in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=k)
        if title in ("logprob mismatch", "grad norm") and all(
                v > 0 for k in keys for v in _series(rows, k)[1]):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(os.path.abspath(run_dir))
    fig.tight_layout()
    out = out or os.path.join(run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir),
                              "metrics.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="mrt plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a training output_dir (holding metrics.jsonl) or the file itself")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    a = ap.parse_args(argv)
    path = plot_run(a.run_dir, a.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
