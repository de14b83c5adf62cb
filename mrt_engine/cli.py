"""`mrt` command line: a branched-rollout demo on the shipped tiny reasoner, and plain generation.

    mrt demo                      # traces + forced-answer forks at every episode boundary (MRT's J)
    mrt generate "prompt" --n 4   # sample completions from a model folder (default: shipped model)
    mrt report [...]              # the tiny reasoner's full measured report (trainer/toy/report.py)
    mrt eval --model DIR --data FILE.jsonl|toy --out DIR   # accuracy vs budget, regret, maj@k
    mrt train --config trainer/configs/toy_grpo.yaml       # GRPO / MRT-RL / MRT-STaR
    mrt plot RUN_DIR              # training curves from RUN_DIR/metrics.jsonl to PNG
"""
from __future__ import annotations

import argparse
import sys
import time


def _demo(a) -> None:
    from mrt_engine import default_model_path
    from mrt_engine.trainer.toy import report

    model = a.model or default_model_path()
    print(f"model: {model}\n{a.problems} problems x {a.samples} traces; forced answers "
          f"(K={a.k}) forked at every episode boundary and at several token budgets")
    t0 = time.perf_counter()
    rep = report.run(model, problems=a.problems, samples=a.samples, k=a.k, seed=a.seed,
                     backend="engine")
    report.print_report(rep)
    print(f"demo finished in {time.perf_counter() - t0:.1f}s (model load included)")


def _generate(a) -> None:
    from mrt_engine import LLM, SamplingParams, default_model_path

    llm = LLM(a.model or default_model_path(), dtype=a.dtype)
    params = SamplingParams(n=a.n, temperature=a.temperature, max_tokens=a.max_tokens, seed=a.seed)
    for out in llm.generate([a.prompt], params):
        for i, c in enumerate(out.outputs):
            print(f"--- sample {i} ({c.finish_reason}, {len(c.token_ids)} tokens)\n{c.text}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="mrt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="branched-rollout demo on the shipped tiny reasoner")
    d.add_argument("--model", default=None)
    d.add_argument("--problems", type=int, default=16)
    d.add_argument("--samples", type=int, default=2)
    d.add_argument("--k", type=int, default=4)
    d.add_argument("--seed", type=int, default=1234)
    g = sub.add_parser("generate", help="sample completions of one prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default=None)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    # Subcommands owned by the trainer layer parse their own flags; the engine imports it lazily.
    delegated = {
        "report": ("mrt_engine.trainer.toy.report", "the tiny reasoner's full report"),
        "eval": ("mrt_engine.trainer.evaluate", "accuracy vs budget, maj@k, regret (mrt eval -h)"),
        "train": ("mrt_engine.trainer.train", "GRPO / MRT-RL / MRT-STaR training (mrt train -h)"),
        "plot": ("mrt_engine.trainer.plot", "training curves of a run to PNG (mrt plot -h)"),
    }
    for name, (_, help_text) in delegated.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in delegated:
        import importlib

        return importlib.import_module(delegated[argv[0]][0]).main(argv[1:])
    a = ap.parse_args(argv)
    {"demo": _demo, "generate": _generate}[a.cmd](a)


def console() -> None:
    """The `mrt` console script: delegated commands return their results to Python callers, but a
    shell must see exit status 0 on success (not the repr of a dict and status 1), and bad input
    must read as one line saying what was expected (MRT_DEBUG=1 keeps the traceback)."""
    import os

    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("MRT_DEBUG"):
            raise
        print(f"mrt: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
