"""HF `deepseek_v4` checkpoints in and out (DeepseekV4ForCausalLM).

Our V4 parameter names are transformers' in-memory names without `model.`. On disk,
transformers 5 (`save_pretrained`) and DeepSeek's release use DeepSeek's own leaf names,
which transformers renames while loading (its `conversion_mapping` for deepseek_v4):
`attn.wq_a` -> `self_attn.q_a_proj`, `ffn.experts.E.w1/w3/w2` -> fused `gate_up_proj` /
`down_proj`, `hc_attn_fn` -> `attn_hc.fn`, `attn.indexer.compressor.*` ->
`self_attn.compressor.indexer.*`, `ape` -> `position_bias`, `head.weight` ->
`lm_head.weight`, ... `LAYER_NAMES` below is that table per layer. Reading accepts
either spelling; writing uses the on-disk one, which `from_pretrained` loads.

MTP: transformers neither builds nor loads DeepSeek's MTP layer. Our own MTP modules
(moeforge.model.v4) are written as `mtp.{k}.<our names>`, which transformers ignores
(`_keys_to_ignore_on_load_unexpected`) and `convert --from-hf` reads back, so a
round trip keeps them; an HF folder without `mtp.*` tensors converts with no MTP.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from moeforge.config import ModelConfig

# on-disk (DeepSeek) leaf name within a layer -> our name
LAYER_NAMES = {
    "attn.attn_sink": "self_attn.sinks",
    "attn.norm.weight": "self_attn.kv_norm.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
TOP_NAMES = {"embed.weight": "embed_tokens.weight", "embed_tokens.weight": "embed_tokens.weight",
             "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "norm.weight",
             "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale",
             "hc_head.hc_fn": "hc_head.hc_fn", "hc_head.hc_base": "hc_head.hc_base",
             "hc_head.hc_scale": "hc_head.hc_scale"}
OURS_TO_DISK = {v: k for k, v in LAYER_NAMES.items()}
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def from_hf_key(hf_key: str) -> tuple[str, int, str] | str | None:
    """Our key, or (fused expert key, expert, 'w1'|'w2'|'w3') for a per-expert tensor; None to skip."""
    key = hf_key.removeprefix("model.")
    if key.startswith("mtp."):
        return key
    if "rotary_emb" in key:
        return None
    m = re.match(r"^layers\.(\d+)\.(.+)$", key)
    if m is None:
        return TOP_NAMES.get(key, key)
    layer, rest = m.group(1), m.group(2)
    e = _EXPERT.match(rest)
    if e:
        name = "gate_up_proj" if e.group(2) in ("w1", "w3") else "down_proj"
        return (f"layers.{layer}.mlp.experts.{name}", int(e.group(1)), e.group(2))
    return f"layers.{layer}.{LAYER_NAMES.get(rest, rest)}"


def iter_hf_v4_tensors(files: dict[str, Path], cfg: ModelConfig, reader) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (key, tensor) pairs from an HF V4 folder's tensors (`reader.get(hf_key)`), experts fused per layer."""
    E, inter = cfg.moe.n_routed_experts, cfg.moe.moe_intermediate_size
    fused: dict[str, torch.Tensor] = {}
    have: dict[str, set[tuple[int, str]]] = {}
    for hf_key in sorted(files):
        ours = from_hf_key(hf_key)
        if ours is None:
            continue
        if isinstance(ours, str):
            yield ours, reader.get(hf_key)
            continue
        key, e, w = ours
        t = reader.get(hf_key)
        if e >= E:
            raise ValueError(f"tensor {hf_key!r}: expert {e} but the config has {E} routed experts")
        if key not in fused:
            D = cfg.hidden_size
            fused[key] = t.new_empty((E, 2 * inter, D) if key.endswith("gate_up_proj") else (E, D, inter))
            have[key] = set()
        dst = fused[key][e]
        if w == "w1":
            dst[:inter].copy_(t)
        elif w == "w3":
            dst[inter:].copy_(t)
        else:
            dst.copy_(t)
        have[key].add((e, w))
    for key, t in fused.items():
        need = {(e, w) for e in range(E) for w in (("w1", "w3") if key.endswith("gate_up_proj") else ("w2",))}
        if have[key] != need:
            e, w = min(need - have[key])
            raise ValueError(f"missing tensor model.{key.rsplit('.mlp', 1)[0]}.ffn.experts.{e}.{w}.weight")
        yield key, t


def hf_v4_tensors(key: str, t: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The on-disk HF (key, tensor) pairs for one of our V4 tensors."""
    if key.startswith("mtp."):
        yield key, t
        return
    if key == "lm_head.weight":
        yield "head.weight", t
        return
    m = re.match(r"^layers\.(\d+)\.(.+)$", key)
    if m is None:
        yield f"model.{key}", t
        return
    layer, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{layer}"
    if rest == "mlp.experts.gate_up_proj":
        inter = cfg.moe.moe_intermediate_size
        for e in range(t.shape[0]):
            yield f"{prefix}.ffn.experts.{e}.w1.weight", t[e, :inter].clone()
            yield f"{prefix}.ffn.experts.{e}.w3.weight", t[e, inter:].clone()
        return
    if rest == "mlp.experts.down_proj":
        for e in range(t.shape[0]):
            yield f"{prefix}.ffn.experts.{e}.w2.weight", t[e].clone()
        return
    if rest not in OURS_TO_DISK:
        raise ValueError(f"no HF deepseek_v4 name for tensor {key!r}")
    yield f"{prefix}.{OURS_TO_DISK[rest]}", t


def check_hf_v4(cfg: ModelConfig) -> None:
    """What transformers' DeepseekV4 cannot express raises; what it computes differently warns."""
    m = cfg.moe
    if m.n_shared_experts != 1:
        raise ValueError(f"HF DeepseekV4 always has one shared expert of width moe_intermediate_size; "
                         f"this model has n_shared_experts={m.n_shared_experts}")
    if not m.norm_topk_prob:
        warnings.warn("HF DeepseekV4 always renormalises the top-k weights; logits from transformers will differ",
                      stacklevel=3)
