"""Model checkpoints: a folder with `config.json` and `model.safetensors`.

`save_model` writes into a temporary sibling folder and renames it into place, so a
crash never leaves a half-written checkpoint. `load_model` builds the model on the
`meta` device, materialises it once on the target device and copies tensors in one at
a time, so loading never holds two copies of the weights. An HF folder (config.json
with a `model_type`) is read through `moeforge.interop.hf`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeforge.config import ModelConfig, load_config
from moeforge.model.transformer import Transformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """Persistent tensors by name; a tied head is stored once (as the embedding)."""
    sd = model.state_dict()
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_model(model: Transformer, path: str | Path, extra_files: dict[str, Path] | None = None) -> Path:
    """Write `path/` atomically: config.json, model.safetensors and any extra files (e.g. tokenizer.json)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model(model, tmp, extra_files)
    return path


def write_model(model: Transformer, folder: Path, extra_files: dict[str, Path] | None = None) -> None:
    """config.json, model.safetensors and extra files into an existing (temporary) folder."""
    model.cfg.save(folder / CONFIG)
    save_file(state_for_saving(model), str(folder / WEIGHTS), metadata={"format": "pt", "producer": "moeforge"})
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, folder / name)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path`, on error it is deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename a finished temp folder onto `path`, keeping the old one until the new one is in place."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                yield key, f.get_tensor(key)
    except FileNotFoundError:
        raise ValueError(f"weights file {path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        if isinstance(e, ValueError) and str(e).startswith("checkpoint"):
            raise
        raise ValueError(f"cannot read weights file {path}: {e}; the file is truncated or corrupt") from None


def load_tensors(model: Transformer, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy named tensors into a materialised model; every parameter/buffer must arrive exactly once."""
    own = dict(model.state_dict(keep_vars=True))
    if model.cfg.tie_word_embeddings:
        own.pop("lm_head.weight", None)
    seen: set[str] = set()
    with torch.no_grad():
        for key, t in tensors:
            if key not in own:
                raise ValueError(f"checkpoint {source}: unexpected tensor {key!r}; is the config right for these weights?")
            dst = own[key]
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(
                    f"checkpoint {source}: tensor {key!r} has shape {tuple(t.shape)}, the config expects {tuple(dst.shape)}"
                )
            dst.copy_(t.to(dst.dtype))
            seen.add(key)
    missing = sorted(set(own) - seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint {source}: missing tensor(s) {', '.join(missing[:3])}{more}")


def build_empty(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None) -> Transformer:
    from moeforge.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives every parameter its own storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    if dtype is not None:
        keep_fp32(model, dtype)
    return model


def keep_fp32(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast to dtype, except router weights and the balance bias, which stay fp32 (numerics that matter)."""
    for name, p in model.named_parameters():
        if not name.endswith("mlp.gate.weight"):
            p.data = p.data.to(dtype)
    return model


def is_hf_folder(path: Path) -> bool:
    try:
        return "model_type" in json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """Load a moeforge or HF checkpoint folder; returns the model in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint folder {path} does not exist")
    from moeforge.device import default_device  # local: device probing is not needed to build configs

    device = torch.device(device) if device is not None else default_device()
    if is_hf_folder(path):
        from moeforge.interop.hf import hf_config, iter_hf_tensors

        cfg = hf_config(path)  # config.json, with the MTP depth the weights actually hold
        model = build_empty(cfg, device, dtype)
        load_tensors(model, iter_hf_tensors(path, cfg), str(path))
    else:
        model = build_empty(load_config(path), device, dtype)
        load_tensors(model, iter_safetensors(path / WEIGHTS), str(path / WEIGHTS))
    return model.eval()
