"""Training checkpoints: save atomically, keep the last K, resume from the newest good one.

A checkpoint is `RUN/checkpoints/step_NNNNNNN/` with the model files (`config.json`,
`model.safetensors`, `tokenizer.json`, so `moeforge generate` and `load_model` read it
directly), `optimizer.pt` (optimizer state dicts, read back with
`torch.load(weights_only=True)`: never an arbitrary pickle) and `trainer_state.json`
(step, data-sampler and RNG states). Each is written to a temporary folder and renamed
into place, so a crash or a full disk leaves the previous checkpoint intact; old ones
are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from moeforge.config import read_json
from moeforge.model.checkpoint import WEIGHTS, atomic_dir, iter_safetensors, load_tensors, write_model
from moeforge.model.transformer import Transformer

CKPT_DIR = "checkpoints"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"
SHARDED_MARKER = ".complete"  # moeforge.distributed.checkpoint.MARKER: the folder holds DCP shards
_STEP = re.compile(r"^step_(\d+)$")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Transformer,
    optimizers: list[torch.optim.Optimizer],
    state: dict[str, Any],
    tokenizer_path: Path | None,
    keep_last: int,
) -> Path:
    path = Path(run_dir) / CKPT_DIR / f"step_{step:07d}"
    extra = {"tokenizer.json": tokenizer_path} if tokenizer_path else None
    try:
        with atomic_dir(path) as tmp:
            write_model(model, tmp, extra)
            torch.save({"optimizers": [o.state_dict() for o in optimizers]}, tmp / OPTIMIZER)
            (tmp / STATE).write_text(json.dumps(state) + "\n")
    except OSError as e:
        previous = next((p for p in checkpoints(run_dir) if p != path), None)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise OSError(f"could not write checkpoint {path}: {e.strerror or e}{kept}") from None
    for old in checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: Transformer, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model and optimizer state in place; ValueError naming the file if anything is unreadable."""
    state = read_json(path / STATE)
    opt_file = path / OPTIMIZER
    try:
        saved = torch.load(opt_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{opt_file} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle opcode, ...
        raise ValueError(f"cannot read {opt_file}: {str(e).splitlines()[0]}; the file is truncated or corrupt") from None
    if len(saved.get("optimizers", [])) != len(optimizers):
        raise ValueError(f"{opt_file} holds {len(saved.get('optimizers', []))} optimizer states, the run has "
                         f"{len(optimizers)}; was the optimizer changed?")
    load_tensors(model, iter_safetensors(path / WEIGHTS), str(path / WEIGHTS))
    for opt, sd in zip(optimizers, saved["optimizers"], strict=True):
        opt.load_state_dict(sd)
    return state


def check_resume_layout(run_dir: Path, multi_process: bool) -> None:
    """Refuse to resume a run whose newest checkpoint was written by the other kind of run: a one-process
    run cannot read a multi-process run's sharded checkpoint, and a multi-process run finding only
    one-process checkpoints would otherwise start again from step 0 and rotate them away."""
    found = checkpoints(run_dir)
    if not found:
        return
    sharded = (found[0] / SHARDED_MARKER).is_file()
    if sharded and not multi_process:
        raise ValueError(f"{found[0]} is a sharded checkpoint of a multi-process run: resume it with the same "
                         f"--nproc, or write a one-process checkpoint with `moeforge convert --consolidate "
                         f"{found[0]} --out DIR`")
    if multi_process and not sharded:
        raise ValueError(f"{found[0]} is a one-process checkpoint and a multi-process run cannot resume it: resume "
                         f"without --nproc, or start the multi-process run in another --out")


def resume_latest(run_dir: Path, model: Transformer, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any] | None:
    """Load the newest readable checkpoint, warning about (and skipping) broken ones. None if there is none."""
    found = checkpoints(run_dir)
    for path in found:
        try:
            state = load_checkpoint(path, model, optimizers)
            state["checkpoint"] = str(path)
            return state
        except ValueError as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
    if found:
        raise ValueError(f"no readable checkpoint in {Path(run_dir) / CKPT_DIR}; start a new run with another --out")
    return None
