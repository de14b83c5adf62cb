"""Training configuration: one validated dataclass with TRL's knob names, loaded from YAML + CLI.

`GRPOConfig` holds every knob of GRPO / Dr. GRPO / DAPO / GSPO training, the data, reward and engine
settings, and the MRT settings (issue 10), each documented in its field's `metadata["help"]`.
Names and defaults follow TRL's `GRPOConfig` where TRL has the knob (`loss_type` defaults to TRL's
current default `dapo`, `beta` to 0.0, ...). `load_config(path, overrides)` reads a YAML file, then
applies command-line overrides in `HfArgumentParser` style (`--max_steps 3`, `--max-steps 3`,
`--flag` for a boolean, `--flag false`); an unknown key, in the file or on the command line, is
refused with its name and the closest field names.

Batch arithmetic (as TRL): `per_device_train_batch_size` counts *completions* per device per
micro-step; one generation round on a device produces `per_device_train_batch_size *
gradient_accumulation_steps` completions (`generation_batch_size`), i.e. `prompts_per_generation =
generation_batch_size / num_generations` prompts, each sampled `num_generations` times. Groups must
be whole on every device (each rank samples its own prompts with its own engine), so
`generation_batch_size` must be a multiple of `num_generations`. One optimizer step consumes one
generation round (`num_iterations` times when > 1).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IS_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
LR_SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")
REWARD_MODES = ("outcome", "mrt_progress", "mrt_termination", "star", "mrt_star")
VERIFIERS = ("toy", "math")
REPORT_TO = ("none", "tensorboard")
PROGRESS_NORMS = ("group", "raw")
DTYPES = ("float32", "bfloat16", "float16")


def _f(default, help: str, **kw):
    """A dataclass field with its documentation in metadata (as TRL / HfArgumentParser do)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class GRPOConfig:
    """Every knob of a training run. See each field's `metadata["help"]` (or `describe()`)."""

    # ---- model ----
    model_name_or_path: Optional[str] = _f(
        None, "Hugging Face folder of the policy (and of the engine). None: the shipped tiny "
              "reasoner, mrt_engine.default_model_path().")
    dtype: str = _f("float32", "Engine dtype (float32 | bfloat16 | float16). The policy trains in fp32.")

    # ---- batch / groups (TRL names) ----
    num_generations: int = _f(8, "G: completions sampled per prompt; advantages are normalised "
                                 "within each group of G.")
    per_device_train_batch_size: int = _f(8, "Completions per device per micro-step (as TRL).")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step; one generation "
                                             "round feeds all of them.")
    num_iterations: int = _f(1, "mu: optimizer passes over each generation round (PPO reuse). "
                                "1 = strictly on-policy; old logps then come from the engine.")

    # ---- optimiser / schedule (HF TrainingArguments names) ----
    learning_rate: float = _f(1e-6, "AdamW peak learning rate (TRL GRPOConfig default 1e-6).")
    lr_scheduler_type: str = _f("linear", "constant | linear | cosine | constant_with_warmup "
                                          "(decay to 0 at max_steps for linear/cosine).")
    warmup_ratio: float = _f(0.0, "Fraction of max_steps spent in linear warmup from 0.")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_steps: int = _f(100, "Number of optimizer steps of the run.")

    # ---- loss (TRL names) ----
    beta: float = _f(0.0, "k3 KL coefficient to the reference (initial) policy. 0: no reference "
                          "model is kept.")
    epsilon: float = _f(0.2, "Lower clip: ratio clipped below at 1 - epsilon.")
    epsilon_high: Optional[float] = _f(None, "Upper clip: ratio clipped above at 1 + epsilon_high. "
                                             "None: = epsilon (DAPO recommends 0.28).")
    loss_type: str = _f("dapo", "grpo (sequence mean then batch mean) | bnpo (local token mean) | "
                                "dapo (token mean over the whole generation batch) | dr_grpo "
                                "(token sum / (B * max_completion_length)). TRL default: dapo.")
    importance_sampling_level: str = _f("token", "token (PPO/GRPO) | sequence (GSPO: one ratio per "
                                                 "sequence, exp of its mean log-ratio).")
    scale_rewards: str = _f("group", "Advantage scaling: group (divide by the group's std) | batch "
                                     "(by the whole batch's std) | none (Dr. GRPO).")
    mask_truncated_completions: bool = _f(False, "Drop completions that hit max_completion_length "
                                                 "without an end token from the loss (DAPO).")

    # ---- generation ----
    max_prompt_length: int = _f(512, "Prompts longer than this (in tokens) are left-truncated.")
    max_completion_length: int = _f(512, "Completion budget in tokens (also the dr_grpo constant).")
    temperature: float = _f(1.0, "Sampling temperature of the rollouts.")
    top_p: float = _f(1.0, "Nucleus sampling of the rollouts (1.0: off). Below 1 the engine's "
                           "logprobs are of the unrenormalised distribution.")
    seed: int = _f(42, "Seed of every RNG (python, numpy, torch, engine, data order).")

    # ---- run / logging ----
    output_dir: str = _f("runs/grpo", "Folder for metrics.jsonl, checkpoints and the final model.")
    save_steps: int = _f(50, "Checkpoint every this many optimizer steps (0: only at the end).")
    logging_steps: int = _f(1, "Print / log metrics every this many steps (metrics.jsonl gets "
                                "every step).")
    eval_steps: int = _f(0, "Held-out accuracy every this many steps (0: never during training).")
    report_to: str = _f("none", "none | tensorboard (also writes metrics.jsonl in both cases).")
    resume: bool = _f(False, "Continue from the latest checkpoint in output_dir.")

    # ---- data ----
    dataset: str = _f("toy", "'toy' (the tiny reasoner's task generator) or a JSONL path with "
                             "`problem` and `answer` fields.")
    dataset_split: str = _f("train", "Split to read from the dataset (for `datasets` loaders).")
    num_train_problems: int = _f(1024, "Training problems (toy: generated; JSONL: first N after the "
                                       "seeded shuffle; 0 = all).")
    toy_difficulty: int = _f(5, "Toy task set size (3..7).")
    eval_dataset: Optional[str] = _f(None, "Held-out set: 'toy' or a JSONL path. None: same kind "
                                           "as `dataset` (toy: disjoint seed).")
    num_eval_problems: int = _f(64, "Held-out problems evaluated every eval_steps.")
    use_chat_template: bool = _f(False, "Wrap prompts in the tokenizer's chat template.")

    # ---- reward ----
    verifier: str = _f("toy", "Outcome verifier: toy | math (grading.py).")
    format_reward_weight: float = _f(0.0, "Weight of the format reward (</think> then exactly one "
                                          "\\boxed{}); 0 disables it.")

    # ---- engine ----
    engine_num_blocks: Optional[int] = _f(None, "KV blocks of the rollout engine (None: sized from "
                                                "engine_kv_memory_gb).")
    engine_kv_memory_gb: float = _f(1.0, "KV memory of the rollout engine in GiB.")

    # ---- MRT (issue 10) ----
    reward_mode: str = _f("outcome", "outcome (GRPO) | mrt_progress (per-episode progress bonus, "
                                     "on-policy) | mrt_termination (paper's termination baseline; "
                                     "m = num_generations rows per prompt) "
                                     "| star | mrt_star.")
    alpha: float = _f(1.0, "Weight of the normalised per-episode progress in the advantage.")
    progress_norm: str = _f("group", "mrt_progress: how episode progress enters the advantage: "
                                     "group (centred and divided by the std of all episode "
                                     "progresses of the prompt's group) | raw (J differences "
                                     "as they are). See trainer/mrt.py.")
    progress_k: int = _f(4, "K forced answers forked at every episode boundary to estimate J.")
    forced_suffix: Optional[str] = _f(None, "Text appended to cut thinking to force an answer. "
                                            "None: the toy task's / the paper's default.")
    episode_triggers: Optional[List[str]] = _f(None, "Paragraph openings that start an episode. "
                                                     "None: the default rule of episodes.py.")
    episode_min_gap: int = _f(1, "Minimum paragraphs between two episode boundaries.")
    episode_max_episodes: int = _f(8, "At most this many episodes per trace (later boundaries are "
                                      "merged).")
    episode_group_size: int = _f(1, "Merge this many consecutive meta-steps into one episode.")
    star_iterations: int = _f(2, "STaR / MRT-STaR: sample-filter-SFT iterations.")
    star_samples_per_prompt: int = _f(8, "STaR / MRT-STaR: traces sampled per prompt each iteration.")
    star_keep_per_prompt: int = _f(1, "STaR / MRT-STaR: at most this many kept traces per prompt.")
    star_epochs: int = _f(1, "STaR / MRT-STaR: SFT epochs over the kept traces per iteration.")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        _coerce_types(self)
        _validate(self)

    @property
    def generation_batch_size(self) -> int:
        """Completions one device samples per generation round (= per optimizer step)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_generation(self) -> int:
        """Distinct prompts one device samples per generation round."""
        return self.generation_batch_size // self.num_generations

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def resolved_model_path(self) -> str:
        if self.model_name_or_path is not None:
            return self.model_name_or_path
        from mrt_engine import default_model_path
        return default_model_path()

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> str:
        """Write the config as YAML (loadable by `load_config`)."""
        import yaml
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        return path

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GRPOConfig":
        _check_keys(d.keys(), "config")
        return cls(**d)

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, type, default, help (for `--help`)."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name} ({_type_name(hints[f.name])}, default {default!r}): "
                         f"{f.metadata.get('help', '')}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# types and validation

def _field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(GRPOConfig)]


def _unwrap_optional(tp):
    """(inner type, is_optional) for Optional[X]."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, opt = _unwrap_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) in (list, List):
        name = "list of str"
    return name + (" or None" if opt else "")


_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _parse_value(name: str, tp, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise naming the field."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")
                         and optional):
        if optional:
            return None
        raise ValueError(f"{name}: None is not allowed (expected {_type_name(tp)})")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected a boolean (true/false), got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if typing.get_origin(inner) in (list, List):
        if isinstance(value, str):
            # command line: a comma-separated list, or a JSON list
            s = value.strip()
            if s.startswith("["):
                try:
                    value = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}: not a valid JSON list: {value!r} ({e})") from None
            else:
                value = [p for p in s.split(",") if p]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"{name}: expected a list of strings, got {value!r}")
    raise TypeError(f"{name}: unsupported field type {tp!r}")  # a bug in this file, not user input


def _coerce_types(cfg: GRPOConfig) -> None:
    hints = typing.get_type_hints(GRPOConfig)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _parse_value(f.name, hints[f.name], getattr(cfg, f.name)))


def _choice(cfg, name: str, choices: Sequence[str]) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {v!r}")


def _check(ok: bool, name: str, what: str, cfg) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {what}, got {getattr(cfg, name)!r}")


def _validate(c: GRPOConfig) -> None:
    _choice(c, "loss_type", LOSS_TYPES)
    _choice(c, "importance_sampling_level", IS_LEVELS)
    _choice(c, "scale_rewards", SCALE_REWARDS)
    _choice(c, "lr_scheduler_type", LR_SCHEDULERS)
    _choice(c, "reward_mode", REWARD_MODES)
    _choice(c, "verifier", VERIFIERS)
    _choice(c, "report_to", REPORT_TO)
    _choice(c, "dtype", DTYPES)
    _choice(c, "progress_norm", PROGRESS_NORMS)
    for name in ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "num_iterations", "max_steps", "max_prompt_length", "max_completion_length",
                 "progress_k", "episode_max_episodes", "episode_group_size", "star_iterations",
                 "star_samples_per_prompt", "star_keep_per_prompt", "star_epochs"):
        _check(getattr(c, name) >= 1, name, "an int >= 1", c)
    for name in ("save_steps", "logging_steps", "eval_steps", "num_train_problems",
                 "num_eval_problems", "episode_min_gap"):
        _check(getattr(c, name) >= 0, name, "an int >= 0", c)
    _check(c.num_generations >= 2, "num_generations",
           "an int >= 2 (a group of one has no spread, so every advantage would be 0)", c)
    if c.generation_batch_size % c.num_generations:
        raise ValueError(
            f"per_device_train_batch_size * gradient_accumulation_steps "
            f"({c.per_device_train_batch_size} * {c.gradient_accumulation_steps} = "
            f"{c.generation_batch_size}) must be a multiple of num_generations "
            f"({c.num_generations}): each device samples whole groups")
    _check(c.learning_rate > 0, "learning_rate", "a number > 0", c)
    _check(0.0 <= c.warmup_ratio <= 1.0, "warmup_ratio", "a number in [0, 1]", c)
    _check(c.weight_decay >= 0, "weight_decay", "a number >= 0", c)
    _check(c.max_grad_norm >= 0, "max_grad_norm", "a number >= 0 (0 disables clipping)", c)
    _check(0.0 <= c.adam_beta1 < 1.0, "adam_beta1", "a number in [0, 1)", c)
    _check(0.0 <= c.adam_beta2 < 1.0, "adam_beta2", "a number in [0, 1)", c)
    _check(c.adam_epsilon > 0, "adam_epsilon", "a number > 0", c)
    _check(c.beta >= 0, "beta", "a number >= 0", c)
    _check(0.0 <= c.epsilon < 1.0, "epsilon", "a number in [0, 1)", c)
    if c.epsilon_high is not None:
        _check(c.epsilon_high >= 0, "epsilon_high", "a number >= 0 or None", c)
    _check(c.temperature > 0, "temperature", "a number > 0", c)
    _check(0.0 < c.top_p <= 1.0, "top_p", "a number in (0, 1]", c)
    _check(c.seed >= 0, "seed", "an int >= 0", c)
    _check(bool(c.output_dir), "output_dir", "a non-empty path", c)
    _check(bool(c.dataset), "dataset", "'toy' or a JSONL path", c)
    from mrt_engine.trainer.toy.task import MAX_DIFFICULTY, MIN_DIFFICULTY
    _check(MIN_DIFFICULTY <= c.toy_difficulty <= MAX_DIFFICULTY, "toy_difficulty",
           f"an int in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY}]", c)
    _check(c.format_reward_weight >= 0, "format_reward_weight", "a number >= 0", c)
    if c.engine_num_blocks is not None:
        _check(c.engine_num_blocks >= 1, "engine_num_blocks", "an int >= 1 or None", c)
    _check(c.engine_kv_memory_gb > 0, "engine_kv_memory_gb", "a number > 0", c)
    _check(c.alpha >= 0, "alpha", "a number >= 0", c)
    if c.reward_mode == "mrt_termination":
        _check(c.num_generations % 2 == 0, "num_generations",
               "an even int with reward_mode mrt_termination (each prompt's group is m/2 "
               "terminating + m/2 continuing rows)", c)
    if c.episode_triggers is not None:
        _check(len(c.episode_triggers) > 0 and all(t for t in c.episode_triggers),
               "episode_triggers", "a non-empty list of non-empty strings, or None", c)
    if c.forced_suffix is not None:
        _check(len(c.forced_suffix) > 0, "forced_suffix", "a non-empty string or None", c)


# ---------------------------------------------------------------------------------------------
# loading

def _check_keys(keys, where: str) -> None:
    names = _field_names()
    for k in keys:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown {where} key {k!r}{hint}")


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """`['--beta', '0.04', '--max-steps=3', '--resume']` -> {'beta': '0.04', ...} (raw strings).

    A boolean field given with no value (next token absent or another `--flag`) means true, as
    HfArgumentParser does; any field may be written with dashes or underscores.
    """
    hints = typing.get_type_hints(GRPOConfig)
    out: Dict[str, Any] = {}
    args = list(overrides)
    i = 0
    while i < len(args):
        tok = args[i]
        if not isinstance(tok, str) or not tok.startswith("--") or len(tok) == 2:
            raise ValueError(f"expected an option like --name VALUE, got {tok!r}")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        _check_keys([key], "command-line")
        i += 1
        if not eq:
            is_bool = _unwrap_optional(hints[key])[0] is bool
            nxt = args[i] if i < len(args) else None
            if is_bool and (nxt is None or nxt.startswith("--")
                            or nxt.strip().lower() not in _TRUE + _FALSE):
                val = "true"
            elif nxt is None:
                raise ValueError(f"--{key}: missing value")
            else:
                val = nxt
                i += 1
        out[key] = _parse_value(key, hints[key], val)
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> GRPOConfig:
    """Defaults <- YAML file at `path` (if any) <- command-line `overrides`; validated."""
    values: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        import yaml
        with open(path) as f:
            data = yaml.safe_load(f)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping of field: value, got "
                             f"{type(data).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        _check_keys(data.keys(), f"config ({path})")
        values.update(data)
    values.update(parse_overrides(overrides))
    return GRPOConfig(**values)
