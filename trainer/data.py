"""Problems and prompts for evaluation and training: local JSONL / `datasets` sets, or the toy task.

    problems = load_problems("../shared/data/math500.jsonl", num_problems=50)   # [{"problem", "answer", ...}]
    problems = load_problems("toy", num_problems=64, difficulty=5, seed=0)
    text = build_prompt(problems[0], tokenizer)          # chat template + opened thinking
    ids = encode_prompt(text, tokenizer)                 # no second BOS when the template has one

A problem is a plain dict with at least `problem` (the question text) and `answer` (the reference).
Toy problems carry the fields of `toy.task.Problem.to_json()` (numbers, target, answer pair, prompt,
solution) plus `problem` and `task: "toy"`, so `Problem.from_json(d)` rebuilds the Problem.
"""
from __future__ import annotations

import os

TOY = "toy"
THINK_OPEN = "<think>\n"


def _check_count(name, v, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def toy_problems(num_problems: int = 64, difficulty: int = 5, seed: int = 0) -> list[dict]:
    """`num_problems` seeded toy problems as dicts (see the module docstring)."""
    from mrt_engine.trainer.toy import task

    out = []
    for p in task.generate_problems(num_problems, difficulty, seed):
        d = p.to_json()
        shown = " ".join(str(x) for x in p.numbers)
        d.update(problem=f"Find two of {shown} that sum to {p.target}.", task=TOY)
        out.append(d)
    return out


def load_problems(data: str, split: str | None = None, num_problems: int | None = None,
                  difficulty: int = 5, seed: int = 0) -> list[dict]:
    """Problems from `data`: "toy" (the generator: `num_problems` (default 64) at `difficulty`,
    drawn from `seed`), a local .jsonl/.json/.parquet/.csv file or a folder of them (read by
    `datasets`), or a `datasets` hub name (needs the network or a local cache). Every row must have
    `problem` and `answer`; the first `num_problems` rows are kept (all when None)."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"data must be a file path, a dataset name or 'toy', got {data!r}")
    _check_count("num_problems", num_problems)
    if data == TOY:
        return toy_problems(64 if num_problems is None else num_problems, difficulty, seed)

    import datasets

    split_name = split or "train"
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    ext = os.path.splitext(data)[1].lower()
    looks_like_path = ext in builders or os.sep in data or data.startswith(".")
    if os.path.isfile(data):
        if ext not in builders:
            raise ValueError(f"cannot read {data!r}: expected a {', '.join(builders)} file")
        loader = lambda: datasets.load_dataset(builders[ext], data_files={split_name: data},  # noqa: E731
                                               split=split_name)
    elif os.path.isdir(data):
        loader = lambda: datasets.load_dataset(data, split=split_name)  # noqa: E731
    elif looks_like_path:
        raise FileNotFoundError(f"no such data file: {data!r} (expected a JSONL file with 'problem' "
                                "and 'answer' fields, a dataset name, or 'toy')")
    else:
        loader = lambda: datasets.load_dataset(data, split=split_name)  # noqa: E731
    try:
        ds = loader()
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise ValueError(f"cannot load {data!r} (split {split_name!r}) with datasets: {exc}") from exc
    except Exception as exc:  # datasets raises its own types (DatasetGenerationError, ...)
        raise ValueError(f"cannot load {data!r} (split {split_name!r}) with datasets: "
                         f"{type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise ValueError(f"{data!r} holds no problems (empty dataset)")
    missing = [f for f in ("problem", "answer") if f not in ds.column_names]
    if missing:
        raise ValueError(f"{data!r} has no {' / '.join(repr(m) for m in missing)} field (columns: "
                         f"{ds.column_names}); every row needs 'problem' and 'answer'")
    n = len(ds) if num_problems is None else min(num_problems, len(ds))
    rows = [dict(r) for r in ds.select(range(n))]
    for i, r in enumerate(rows):
        for f in ("problem", "answer"):
            if r[f] is None or (isinstance(r[f], str) and not r[f].strip()):
                raise ValueError(f"{data!r} row {i} has an empty {f!r} field")
        r["answer"] = str(r["answer"])
    return rows


def _has_think_token(tokenizer) -> bool:
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return False
    return "<think>" in vocab


def build_prompt(problem: dict, tokenizer=None, use_chat_template: bool = True,
                 system: str | None = None, think_open: str | None = THINK_OPEN) -> str:
    """The prompt text for one problem; the model's thinking starts right after it.

    Toy problems use their own `prompt` (`Problem.prompt()`, ends with "<think>\\n"). Otherwise, with a
    tokenizer that has a chat template (and `use_chat_template`), the template renders [system,
    user] with the generation prompt; thinking is then opened with `think_open` unless the template
    already did (R1-distill templates end with "<think>\\n"), and only for tokenizers that know a
    "<think>" token (a plain instruct model is left as its template leaves it). Without a template:
    "[system]\\n\\n{problem}\\n" + `think_open`.
    """
    if not isinstance(problem, dict) or "problem" not in problem:
        raise TypeError(f"problem must be a dict with a 'problem' field, got {problem!r:.80}")
    if problem.get("task") == TOY and "prompt" in problem:
        return problem["prompt"]
    question = str(problem["problem"])
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if use_chat_template and template:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        opened = text.rstrip().endswith("<think>")
        if think_open and not opened and (_has_think_token(tokenizer) or "<think>" in template):
            text += think_open
        return text
    head = f"{system}\n\n" if system else ""
    return f"{head}{question}\n{think_open or ''}"


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a prompt; the tokenizer's BOS is added unless the text already starts with it
    (chat templates write it themselves: a second one would shift the model's input)."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])
