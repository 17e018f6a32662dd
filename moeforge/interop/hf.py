"""Read HF DeepSeek V2 / V3 / Kimi-K2 checkpoints as moeforge tensors.

An HF folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Keys map onto ours (moeforge.model.transformer) as:

* `model.` is stripped; `lm_head.weight` stays;
* per-expert `layers.N.mlp.experts.E.{gate,up,down}_proj.weight` (DeepSeek's release
  layout, and what transformers 5 `save_pretrained` writes) are fused into our
  `layers.N.mlp.experts.gate_up_proj` (E, 2I, D: gate rows, then up rows) and
  `down_proj` (E, D, I); the already-fused transformers-5 in-memory keys pass through;
* MTP module k (V3 report section 2.2) is stored as `model.layers.{L + k}.*` with L =
  num_hidden_layers: `enorm`, `hnorm`, `eh_proj` keep their names, `shared_head.norm`
  becomes `norm`, the decoder-block keys go under `block.`, and the copies of the
  embedding and head (`embed_tokens`, `shared_head.head`) are skipped: they equal the
  main model's;
* FP8 weights with a `weight_scale_inv` companion (DeepSeek-V3's 128x128 block scales)
  are dequantised to bf16 as they are read.

Tensors stream one at a time, grouped by layer, so at most one layer's experts are held
while they are fused. Unknown, missing and mis-shaped tensors raise `ValueError` naming
the HF tensor and its file.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeforge.config import ModelConfig, read_json

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.")


# ------------------------------------------------------------------ folder, config
def weight_files(folder: Path) -> dict[str, Path]:
    """HF key -> the safetensors file that holds it (from the index, or the single file's header)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index} has no 'weight_map' object")
        files = {name: folder / name for name in set(wm.values())}
        for name, path in files.items():
            if not path.is_file():
                raise ValueError(f"{index} lists {name}, which does not exist in {folder}")
        return {key: files[name] for key, name in wm.items()}
    single = folder / SINGLE
    if not single.is_file():
        raise ValueError(f"{folder} has neither {SINGLE} nor {INDEX}")
    with _open(single) as f:
        return {key: single for key in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable


def hf_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of an HF folder, with the MTP depth taken from the weights actually present.

    Many HF checkpoints (any transformers `save_pretrained`, most quantised re-uploads) keep
    `num_nextn_predict_layers: 1` in config.json but drop the MTP layer; those convert
    without MTP, with a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist")
    d = read_json(folder / CONFIG)
    if "model_type" not in d:
        raise ValueError(f"{folder / CONFIG} is not an HF config.json (no 'model_type')")
    try:
        cfg = ModelConfig.from_hf_dict(d, name=folder.name or "hf")
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{folder / CONFIG}: invalid value in config ({e})") from None
    L, declared = cfg.num_layers, cfg.mtp.num_layers
    present = set()
    for key in weight_files(folder):
        m = _LAYER.match(key.removeprefix("model."))
        if m and int(m.group(1)) >= L:
            present.add(int(m.group(1)) - L)
        m = re.match(r"^mtp\.(\d+)\.", key)
        if m and cfg.v4 is not None:  # V4: our MTP modules (moeforge.interop.hf_v4)
            present.add(int(m.group(1)))
    if present - set(range(declared)):
        extra = min(present - set(range(declared))) + L
        raise ValueError(f"checkpoint {folder}: holds layer model.layers.{extra} beyond num_hidden_layers={L} "
                         f"+ num_nextn_predict_layers={declared}; fix num_nextn_predict_layers in config.json")
    if len(present) < declared:
        have = 0
        while have in present:
            have += 1
        if present - set(range(have)):
            raise ValueError(f"checkpoint {folder}: MTP layer model.layers.{L + have}.* is missing "
                             f"(config.json declares num_nextn_predict_layers={declared})")
        warnings.warn(f"{folder}: config.json declares {declared} MTP layer(s) but the weights hold {have}; "
                      f"converting with mtp.num_layers={have}", stacklevel=2)
        cfg.mtp.num_layers = have
    return cfg


def hf_dtype(folder: str | Path) -> torch.dtype:
    """The checkpoint's floating dtype, read from the embedding's header (FP8 checkpoints: bf16)."""
    files = weight_files(Path(folder))
    key = next((k for k in ("model.embed_tokens.weight", "embed_tokens.weight") if k in files), None)
    if key is None:
        raise ValueError(f"checkpoint {folder}: no model.embed_tokens.weight")
    with _open(files[key]) as f:
        dtype = stored_dtype(f, key)
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def stored_dtype(handle: Any, key: str) -> torch.dtype:
    """The dtype of `key` in an open safetensors file, from its header (the data is not read)."""
    name = handle.get_slice(key).get_dtype()
    dtype = _SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"tensor {key!r} has dtype {name}, which is not a supported floating dtype")
    return dtype


# ------------------------------------------------------------------ key mapping
def from_hf_key(hf_key: str, num_layers: int) -> str | None:
    """Our name for an HF key (experts still per-expert); None for the MTP copies of embedding/head."""
    key = hf_key.removeprefix("model.")
    m = _LAYER.match(key)
    if m is None or int(m.group(1)) < num_layers:
        return key
    k, rest = int(m.group(1)) - num_layers, m.group(2)
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest.startswith(_MTP_OWN):
        return f"mtp.{k}.{rest}"
    if rest.startswith("shared_head.norm."):
        return f"mtp.{k}.norm.{rest.removeprefix('shared_head.norm.')}"
    return f"mtp.{k}.block.{rest}"


def to_hf_key(key: str, num_layers: int) -> str:
    """The HF name of one of our keys (fused expert keys keep their fused name)."""
    if key == "lm_head.weight":
        return key
    m = re.match(r"^mtp\.(\d+)\.(.+)$", key)
    if m is None:
        return f"model.{key}"
    layer, rest = num_layers + int(m.group(1)), m.group(2)
    if rest.startswith(_MTP_OWN):
        return f"model.layers.{layer}.{rest}"
    if rest.startswith("norm."):
        return f"model.layers.{layer}.shared_head.{rest}"
    return f"model.layers.{layer}.{rest.removeprefix('block.')}"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes for cfg, from a model built on the meta device (no memory)."""
    from moeforge.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _iter_v4(folder: Path, files: dict[str, Path], cfg: ModelConfig, reader: _Reader,
             expected: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    from moeforge.interop.hf_v4 import iter_hf_v4_tensors

    files = {k: v for k, v in files.items() if not k.endswith("_scale_inv")}
    seen: set[str] = set()
    try:
        for ours, t in iter_hf_v4_tensors(files, cfg, reader):
            if ours not in expected:
                raise ValueError(f"checkpoint {folder}: tensor {ours!r} (our name) is unexpected for this config; "
                                 f"is config.json right for these weights?")
            if tuple(t.shape) != expected[ours]:
                raise ValueError(f"checkpoint {folder}: tensor {ours!r} has shape {tuple(t.shape)}, "
                                 f"the config expects {expected[ours]}")
            seen.add(ours)
            yield ours, t
    finally:
        reader.close()
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"checkpoint {folder}: missing tensor(s) {', '.join(missing[:3])} (our names)")


# ------------------------------------------------------------------ FP8
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """DeepSeek block-scaled FP8 -> bf16: each (block x block) tile of weight is multiplied by its scale."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = block
    want = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {rows}x{cols} weight in "
                         f"{br}x{bc} blocks needs {want}")
    s = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() * s).to(torch.bfloat16)


# ------------------------------------------------------------------ reading
def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise ValueError(f"weights file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated/corrupt files
        raise ValueError(f"cannot read weights file {path}: {e}; the file is truncated or corrupt") from None


class _Reader:
    """Random access to tensors by HF key across shards; FP8 weights come back dequantised."""

    def __init__(self, files: dict[str, Path], block: tuple[int, int]):
        self.files, self.block = files, block
        self.handles: dict[Path, Any] = {}

    def raw(self, key: str) -> torch.Tensor:
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = _open(path).__enter__()
        try:
            return self.handles[path].get_tensor(key)
        except Exception as e:  # noqa: BLE001 - any read failure becomes a one-line error naming the file
            raise ValueError(f"cannot read tensor {key!r} from {path}: {e}") from None

    def get(self, key: str) -> torch.Tensor:
        t = self.raw(key)
        scale_key = key + "_scale_inv"
        if scale_key in self.files:
            try:
                return dequantize_fp8(t, self.raw(scale_key), self.block)
            except ValueError as e:
                raise ValueError(f"tensor {key!r} in {self.files[key].name}: {e}") from None
        if t.dtype in FP8_DTYPES:
            raise ValueError(f"tensor {key!r} in {self.files[key].name} is {t.dtype} but has no "
                             f"{scale_key!r} companion to dequantise it with")
        return t

    def close(self) -> None:
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles.clear()


def _layer_order(hf_key: str) -> int:
    m = _LAYER.match(hf_key.removeprefix("model."))
    if m:
        return int(m.group(1))
    return -1 if "embed_tokens" in hf_key else 1 << 30


class _ExpertFuser:
    """Collects one layer's per-expert weights into preallocated fused tensors."""

    def __init__(self, prefix: str, cfg: ModelConfig, dtype: torch.dtype):
        E, inter, D = cfg.moe.n_routed_experts, cfg.moe.moe_intermediate_size, cfg.hidden_size
        self.prefix, self.inter = prefix, inter
        self.gate_up = torch.empty(E, 2 * inter, D, dtype=dtype)
        self.down = torch.empty(E, D, inter, dtype=dtype)
        self.want = {"gate_proj": (inter, D), "up_proj": (inter, D), "down_proj": (D, inter)}
        self.have = torch.zeros(E, 3, dtype=torch.bool)

    def add(self, expert: int, proj: str, t: torch.Tensor) -> None:
        if proj == "gate_proj":
            self.gate_up[expert, : self.inter].copy_(t)
        elif proj == "up_proj":
            self.gate_up[expert, self.inter :].copy_(t)
        else:
            self.down[expert].copy_(t)
        self.have[expert, EXPERT_PROJS.index(proj)] = True

    def missing(self) -> list[tuple[int, str]]:
        return [(int(e), EXPERT_PROJS[int(p)]) for e, p in (~self.have).nonzero().tolist()]


def iter_hf_tensors(folder: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (key, tensor) pairs from an HF DeepSeek V2/V3 folder, one layer at a time."""
    folder = Path(folder)
    files = weight_files(folder)
    quant = read_json(folder / CONFIG).get("quantization_config") or {}
    br, bc = quant.get("weight_block_size") or (128, 128)
    expected = expected_shapes(cfg)
    L, E = cfg.num_layers, cfg.moe.n_routed_experts
    reader = _Reader(files, (int(br), int(bc)))
    seen: set[str] = set()
    if cfg.v4 is not None:
        yield from _iter_v4(folder, files, cfg, reader, expected)
        return

    def where(hf_key: str) -> str:
        return f"checkpoint {folder}: tensor {hf_key!r} in {files[hf_key].name}"

    def check(ours: str, hf_key: str, t: torch.Tensor) -> None:
        if ours not in expected:
            raise ValueError(f"{where(hf_key)} is unexpected (no {ours!r} in this config); "
                             f"is config.json right for these weights?")
        if tuple(t.shape) != expected[ours]:
            raise ValueError(f"{where(hf_key)} has shape {tuple(t.shape)}, the config expects {expected[ours]}")

    keys = sorted(files, key=lambda k: (_layer_order(k), k))
    try:
        i = 0
        while i < len(keys):
            group = _layer_order(keys[i])
            j = i
            while j < len(keys) and _layer_order(keys[j]) == group:
                j += 1
            fusers: dict[str, tuple[_ExpertFuser, str]] = {}
            for hf_key in keys[i:j]:
                if hf_key.endswith("_scale_inv"):
                    if hf_key.removesuffix("_scale_inv") not in files:
                        raise ValueError(f"{where(hf_key)} has no weight to scale")
                    continue
                if hf_key.endswith("rotary_emb.inv_freq"):  # a recomputed buffer some exporters save
                    continue
                ours = from_hf_key(hf_key, L)
                if ours is None:
                    continue
                m = _EXPERT.match(ours)
                if m is not None:
                    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                    if prefix + ".gate_up_proj" not in expected or e >= E:
                        raise ValueError(f"{where(hf_key)} is unexpected (this config has {E} routed experts "
                                         f"and no MoE at {prefix!r}); is config.json right for these weights?")
                    t = reader.get(hf_key)
                    if prefix not in fusers:
                        fusers[prefix] = (_ExpertFuser(prefix, cfg, t.dtype), hf_key.split(".experts.")[0])
                    fuser = fusers[prefix][0]
                    if tuple(t.shape) != fuser.want[proj]:
                        raise ValueError(f"{where(hf_key)} has shape {tuple(t.shape)}, the config expects "
                                         f"{fuser.want[proj]}")
                    fuser.add(e, proj, t)
                    continue
                t = reader.get(hf_key)
                if ours not in expected and t.numel() == 0 and ".shared_experts." in ours:
                    continue  # n_shared_experts = 0: HF keeps zero-width shared experts
                if ours.endswith("e_score_correction_bias") and ours not in expected and not t.any():
                    continue  # a zero bias from a router that does not use one
                check(ours, hf_key, t)
                seen.add(ours)
                yield ours, t
            for prefix, (fuser, hf_prefix) in fusers.items():
                gone = fuser.missing()
                if gone:
                    names = ", ".join(f"{hf_prefix}.experts.{e}.{p}.weight" for e, p in gone[:3])
                    more = f" (and {len(gone) - 3} more)" if len(gone) > 3 else ""
                    raise ValueError(f"checkpoint {folder}: missing tensor(s) {names}{more}")
                for name, t in (("gate_up_proj", fuser.gate_up), ("down_proj", fuser.down)):
                    seen.add(f"{prefix}.{name}")
                    yield f"{prefix}.{name}", t
            fusers.clear()
            i = j
    finally:
        reader.close()
    missing = sorted(set(expected) - seen)
    if missing:
        names = ", ".join(to_hf_key(k, L) for k in missing[:3])
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint {folder}: missing tensor(s) {names}{more}")
