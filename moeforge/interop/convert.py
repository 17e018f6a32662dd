"""Convert checkpoints between HF DeepSeek V2/V3/V4 folders and moeforge folders (V4: moeforge.interop.hf_v4).

`convert_from_hf` streams the HF tensors (moeforge.interop.hf) into a CPU model held in
the checkpoint's own dtype and saves it with `save_model` (atomic). `convert_to_hf`
streams a moeforge checkpoint tensor by tensor into the layout of DeepSeek's own
releases, which transformers 5 loads with `AutoModelForCausalLM.from_pretrained`:

* per-expert `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`;
* MTP module k as `model.layers.{L + k}.*` (enorm, hnorm, eh_proj, shared_head.norm,
  the block's keys, plus copies of the embedding and head as `embed_tokens` and
  `shared_head.head`, which DeepSeek's release and vLLM's MTP loader carry);
* shards of at most `max_shard_bytes` with `model.safetensors.index.json` once the
  weights exceed it (one tensor larger than the limit gets a shard of its own).

Where transformers' modeling code differs from DeepSeek's reference, the HF folder is
written so that transformers computes the same function: a softmax-routed model (HF
`deepseek_v2`, whose rotary embedding is always interleaved) with half-split RoPE has
its rotary rows permuted into interleaved order; sigmoid routing without a bias is
written as `noaux_tc` with one group and a zero bias. What HF cannot express raises
`ValueError` (see docs/interop.md).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moeforge.config import ModelConfig, load_config
from moeforge.interop.hf import (
    CONFIG,
    INDEX,
    SINGLE,
    _open,
    expected_shapes,
    hf_config,
    hf_dtype,
    iter_hf_tensors,
    stored_dtype,
    to_hf_key,
)
from moeforge.model.checkpoint import WEIGHTS, atomic_dir, build_empty, is_hf_folder, load_tensors, save_model

EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
DEFAULT_SHARD_BYTES = 5 * 10**9


def _extra_files(src: Path) -> dict[str, Path]:
    return {name: src / name for name in EXTRA_FILES if (src / name).is_file()}


def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise ValueError(f"checkpoint folder {src} does not exist")
    if not (src / CONFIG).is_file():
        raise ValueError(f"{src} has no {CONFIG}; is it a checkpoint folder?")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source folder; write to a new folder")


# ---------------------------------------------------------------- HF -> moeforge
def convert_from_hf(src: str | Path, out: str | Path) -> Path:
    """Write the HF DeepSeek V2/V3 folder `src` as a moeforge checkpoint folder `out`."""
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    cfg = hf_config(src)
    model = build_empty(cfg, torch.device("cpu"), hf_dtype(src))
    load_tensors(model, iter_hf_tensors(src, cfg), str(src))
    return save_model(model, out, extra_files=_extra_files(src))


# ---------------------------------------------------------------- moeforge -> HF
def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for the HF folder convert_to_hf writes (see the module docstring for the adjustments)."""
    m = cfg.moe
    hf = cfg.to_hf_dict()
    name = str(dtype).removeprefix("torch.")
    hf["torch_dtype"] = hf["dtype"] = name
    if cfg.v4 is not None:
        from moeforge.interop.hf_v4 import check_hf_v4

        check_hf_v4(cfg)
        return hf
    if hf["model_type"] == "deepseek_v2":
        if m.topk_method == "noaux_tc":
            raise ValueError("softmax routing with topk_method 'noaux_tc' has no HF DeepseekV2 equivalent "
                             "(it has no router bias); use 'greedy' or 'group_limited_greedy'")
        if m.norm_topk_prob:
            warnings.warn("transformers' DeepseekV2 router ignores norm_topk_prob=True (DeepSeek's own code "
                          "honours it): logits from transformers will differ", stacklevel=3)
        hf["rope_interleave"] = True  # rotary rows are written interleaved (see _rope_to_interleaved)
    else:
        if m.topk_method == "group_limited_greedy":
            raise ValueError("sigmoid routing with topk_method 'group_limited_greedy' has no HF DeepseekV3 "
                             "equivalent (it always scores groups by their top-2 with a bias); use 'noaux_tc'")
        if m.topk_method == "greedy":  # HF V3 always groups: one group is plain top-k
            hf.update(topk_method="noaux_tc", n_group=1, topk_group=1)
    return hf


def _rope_to_interleaved(t: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Reorder the last rope_dim of every head_dim rows from half-split (x_i, x_{i+R/2}) pairs to (x_2i, x_2i+1)."""
    half = rope_dim // 2
    perm = torch.arange(rope_dim).view(2, half).t().reshape(-1)  # 0, R/2, 1, R/2+1, ...
    rows = t.view(-1, head_dim, *t.shape[1:]).clone()
    rows[:, head_dim - rope_dim :] = rows[:, head_dim - rope_dim :][:, perm]
    return rows.view(t.shape)


def _hf_tensors(key: str, t: torch.Tensor, cfg: ModelConfig, permute_rope: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF (key, tensor) pairs for one of our tensors."""
    L, a, m = cfg.num_layers, cfg.attention, cfg.moe
    hf_key = to_hf_key(key, L)
    if key.endswith(".mlp.experts.gate_up_proj"):
        base = hf_key.removesuffix(".gate_up_proj")
        inter = m.moe_intermediate_size
        for e in range(t.shape[0]):
            yield f"{base}.{e}.gate_proj.weight", t[e, :inter].clone()
            yield f"{base}.{e}.up_proj.weight", t[e, inter:].clone()
        return
    if key.endswith(".mlp.experts.down_proj"):
        base = hf_key.removesuffix(".down_proj")
        for e in range(t.shape[0]):
            yield f"{base}.{e}.down_proj.weight", t[e].clone()
        return
    if permute_rope:
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            t = _rope_to_interleaved(t, a.qk_head_dim, a.qk_rope_head_dim)
        elif re.search(r"self_attn\.kv_a_proj_with_mqa\.(weight|bias)$", key):
            t = _rope_to_interleaved(t, a.kv_lora_rank + a.qk_rope_head_dim, a.qk_rope_head_dim)
    yield hf_key, t
    if key.endswith(".mlp.gate.weight"):
        router = hf_key.removesuffix(".weight")
        if cfg.moe.scoring_func == "sigmoid" and not cfg.moe.has_bias:
            yield f"{router}.e_score_correction_bias", torch.zeros(m.n_routed_experts, dtype=torch.float32)
        if m.n_shared_experts == 0:  # HF always builds shared experts; zero width adds nothing
            shared, D = hf_key.removesuffix(".gate.weight") + ".shared_experts", cfg.hidden_size
            dtype = torch.float32
            yield f"{shared}.gate_proj.weight", torch.zeros(0, D, dtype=dtype)
            yield f"{shared}.up_proj.weight", torch.zeros(0, D, dtype=dtype)
            yield f"{shared}.down_proj.weight", torch.zeros(D, 0, dtype=dtype)


class _ShardWriter:
    """Accumulates tensors into shards of at most `limit` bytes; `finish` names them and writes the index."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.limit:
            self.flush()
        self.pending[key] = t.contiguous()
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-0").rename(self.folder / SINGLE)
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{i}").rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _source_order(key: str) -> tuple[int, int, str]:
    m = re.match(r"^(layers|mtp)\.(\d+)\.", key)
    if m:
        return (1 if m.group(1) == "layers" else 2, int(m.group(2)), key)
    return (0 if key.startswith("embed_tokens") else 3, 0, key)


def convert_to_hf(src: str | Path, out: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the moeforge checkpoint folder `src` as an HF DeepseekV3/V2 folder `out` (DeepSeek's layout)."""
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    if is_hf_folder(src):
        raise ValueError(f"{src} is already an HF checkpoint folder (its config.json has a model_type)")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0 (got {max_shard_bytes})")
    cfg = load_config(src)
    weights = src / WEIGHTS
    expected = expected_shapes(cfg)
    with atomic_dir(out) as tmp:
        with _open(weights) as f:
            keys = list(f.keys())
            for key in keys:
                if key not in expected:
                    raise ValueError(f"checkpoint {weights}: unexpected tensor {key!r}; is config.json right?")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise ValueError(f"checkpoint {weights}: tensor {key!r} has shape {shape}, "
                                     f"the config expects {expected[key]}")
            missing = sorted(set(expected) - set(keys))
            if missing:
                raise ValueError(f"checkpoint {weights}: missing tensor(s) {', '.join(missing[:3])}")
            dtype = stored_dtype(f, "embed_tokens.weight")
            hf = hf_config_dict(cfg, dtype)
            permute_rope = hf["model_type"] == "deepseek_v2" and not cfg.attention.rope.interleave
            head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            writer = _ShardWriter(tmp, max_shard_bytes)
            for key in sorted(keys, key=_source_order):
                if cfg.v4 is not None:  # DeepSeek-V4 names (moeforge.interop.hf_v4)
                    from moeforge.interop.hf_v4 import hf_v4_tensors

                    for hf_key, t in hf_v4_tensors(key, f.get_tensor(key), cfg):
                        writer.add(hf_key, t)
                    continue
                for hf_key, t in _hf_tensors(key, f.get_tensor(key), cfg, permute_rope):
                    writer.add(hf_key, t)
                m = re.match(r"^mtp\.(\d+)\.norm\.weight$", key)
                if m:  # DeepSeek's layout repeats the shared embedding and head inside each MTP layer
                    layer = cfg.num_layers + int(m.group(1))
                    writer.add(f"model.layers.{layer}.embed_tokens.weight", f.get_tensor("embed_tokens.weight").clone())
                    writer.add(f"model.layers.{layer}.shared_head.head.weight", f.get_tensor(head).clone())
            writer.finish()
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        for name, path in _extra_files(src).items():
            shutil.copyfile(path, tmp / name)
    return out
