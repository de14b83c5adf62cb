"""Checkpoints: everything exact resume needs, in one folder per step.

    output_dir/checkpoint-{step}/
        model.safetensors, config.json, tokenizer files   save_pretrained: `mrt eval --model` loads it
        trainer_state.pt      step, optimizer, LR scheduler, data position, the pending round (if any)
        rng_state_{rank}.pt   python, numpy, torch (+ cuda) and engine RNG states of each rank
        grpo_config.yaml      the run's config

A checkpoint is written into `checkpoint-{step}.tmp` and renamed when complete, so a crash mid-save
never leaves a folder that `latest_checkpoint` would pick.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.pt"


def rng_state(llm=None) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if llm is not None:
        st["engine"] = llm.get_rng_state()
    return st


def set_rng_state(st: dict, llm=None) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if llm is not None and "engine" in st:
        llm.set_rng_state(st["engine"])


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def save(output_dir: str, step: int, *, model, tokenizer, state: dict, cfg, dist, llm=None) -> str:
    """Write checkpoint-{step} (all ranks call this; rank 0 writes the shared files)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final + ".tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    torch.save(rng_state(llm), os.path.join(tmp, f"rng_state_{dist.rank}.pt"))
    if dist.is_main:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg.save(os.path.join(tmp, "grpo_config.yaml"))
        torch.save(state, os.path.join(tmp, STATE))
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint with the highest step in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE)):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), path)
    return best[1] if best else None


def resolve(resume, output_dir: str) -> Optional[str]:
    """`--resume` (True: latest in output_dir) or `--resume PATH` -> a checkpoint folder."""
    if resume in (None, False, ""):
        return None
    if resume is True:
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N folder with {STATE} in {output_dir!r}")
        return path
    path = str(resume)
    if not os.path.isfile(os.path.join(path, STATE)):
        inner = latest_checkpoint(path)   # a run's output_dir is accepted too
        if inner is None:
            raise FileNotFoundError(f"--resume {path!r}: expected a checkpoint-N folder holding {STATE} "
                                    "or an output_dir that has one")
        path = inner
    return path


def load_state(path: str, rank: int) -> tuple[dict, dict]:
    """(trainer_state, this rank's rng state) of a checkpoint folder."""
    state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=False)
    rng_path = os.path.join(path, f"rng_state_{rank}.pt")
    if not os.path.isfile(rng_path):
        raise FileNotFoundError(f"{rng_path} is missing: was the checkpoint written by fewer ranks?")
    return state, torch.load(rng_path, map_location="cpu", weights_only=False)
