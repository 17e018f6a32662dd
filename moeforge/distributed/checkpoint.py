"""Sharded checkpoints of multi-process runs with `torch.distributed.checkpoint` (DCP), and consolidation.

Each rank writes its own shards: FSDP2 parameters and their optimizer state are DTensors
already; an expert-parallel slice is presented to DCP as a DTensor of the full (E, ...)
expert tensor, sharded over the EP mesh dimension and replicated over dp_shard, so DCP
records where every slice belongs. Everything goes into a temporary folder; when every
rank is done, rank 0 adds `config.json`, `tokenizer.json`, `trainer_state.json` and the
completion marker `.complete`, then renames the folder into place. Resuming loads the
same structure in place (DCP reshards, so the EP size may even differ).

`consolidate(src, out)` reads a DCP checkpoint in one process, without any process group,
into a full single-device model and writes the ordinary one-file checkpoint that
`generate`, `serve` and `load_model` read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeforge.config import read_json
from moeforge.distributed.expert_parallel import ExpertParallelExperts
from moeforge.train.state import SHARDED_MARKER as MARKER

STATE = "trainer_state.json"


def _expert_params(model: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def _as_global(t: torch.Tensor, par: Any) -> DTensor:
    return DTensor.from_local(t, par.mesh, [Replicate(), Shard(0)], run_check=False)


class _Writeback(list):
    """(live FSDP shard, full expert slice) pairs: after a load, each slice's dp_shard chunk goes back."""

    def apply(self, par: Any) -> None:
        for live, full in self:
            live.to_local().copy_(full.chunk(par.dims.dp_shard)[par.dp_rank])


def _expert_global(t: torch.Tensor, par: Any, writeback: _Writeback) -> DTensor:
    """An expert tensor (this EP rank's slice, or with dp_shard > 1 its FSDP shard) as a DTensor of all E experts."""
    if isinstance(t, DTensor):  # sharded over dp_shard: gather this EP rank's full slice first
        full = t.full_tensor()
        writeback.append((t, full))
        t = full
    return _as_global(t, par)


def _model_state(model: nn.Module, par: Any, writeback: _Writeback) -> dict[str, Any]:
    experts = _expert_params(model)
    state = model.state_dict(keep_vars=True)
    return {k: (_expert_global(v.data, par, writeback) if id(v) in experts
                else v.data if isinstance(v, nn.Parameter) else v)
            for k, v in state.items()}


def _optim_state(model: nn.Module, opt: torch.optim.Optimizer, par: Any, writeback: _Writeback) -> dict[str, Any]:
    """The optimizer's state dict; its tensors are the live ones (DCP loads into them in place)."""
    experts = _expert_params(model)
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in sd["state"].items():
        if id(params[idx]) in experts:
            sd["state"][idx] = {k: (_expert_global(v, par, writeback) if torch.is_tensor(v) and v.dim() > 0 else v)
                                for k, v in st.items()}
    return sd


def _init_optimizer_state(opts: list[torch.optim.Optimizer]) -> None:
    """A fresh optimizer has no state tensors to load into: take one step with zero lr and zero grads."""
    for opt in opts:
        if opt.state:
            continue
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for g, lr in zip(opt.param_groups, saved, strict=True):
            g["lr"] = lr


def save_sharded(path: Path, model: nn.Module, opts: list[torch.optim.Optimizer], par: Any, state: dict,
                 tokenizer: Path | None) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    wb = _Writeback()
    dcp.save({"model": _model_state(model, par, wb), "optim": [_optim_state(model, o, par, wb) for o in opts]},
             checkpoint_id=str(tmp))
    dist.barrier()
    if par.is_main:
        model.cfg.save(tmp / "config.json")
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        (tmp / STATE).write_text(json.dumps(state) + "\n")
        (tmp / MARKER).write_text(json.dumps({"world": par.dims.world, "ep": par.dims.ep}) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    dist.barrier()
    return path


def is_sharded(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def load_sharded(path: Path, model: nn.Module, opts: list[torch.optim.Optimizer], par: Any) -> dict:
    if not is_sharded(path):
        raise ValueError(f"{path} is not a complete sharded checkpoint (no {MARKER})")
    _init_optimizer_state(opts)
    wb = _Writeback()
    # every tensor handed to DCP is live model / optimizer state (or a view of it): loading is in place
    state = {"model": _model_state(model, par, wb), "optim": [_optim_state(model, o, par, wb) for o in opts]}
    dcp.load(state, checkpoint_id=str(path))
    wb.apply(par)
    return read_json(path / STATE)


def consolidate(src: str | Path, out: str | Path) -> Path:
    """A sharded (DCP) checkpoint folder -> an ordinary one-file moeforge checkpoint folder."""
    from moeforge.config import load_config
    from moeforge.model import build_model
    from moeforge.model.checkpoint import save_model

    src, out = Path(src), Path(out)
    if not is_sharded(src):
        raise ValueError(f"{src} is not a complete sharded checkpoint (no {MARKER}); nothing to consolidate")
    model = build_model(load_config(src))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(src), no_dist=True)
    model.load_state_dict(state["model"])
    extra = {n: src / n for n in ("tokenizer.json",) if (src / n).is_file()}
    return save_model(model, out, extra)
