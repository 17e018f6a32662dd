"""DeepSeek-V4 configuration helpers: validation, presets, HF `deepseek_v4` config.json mapping.

The fields themselves are `moeforge.config.V4Config` (HF `DeepseekV4Config` names). HF
keeps the V4 specifics in a handful of keys:

* `layer_types` (or the DeepSeek release's per-layer `compress_ratios`: 0 sliding, 4 CSA,
  128 HCA; a trailing extra entry is the MTP layer's and is dropped), `compress_rates`
  (or `compress_rate_csa` / `compress_rate_hca`);
* `mlp_layer_types` (or `num_hash_layers`: the first n layers are hash-routed);
* `head_dim` with `partial_rotary_factor` (or `qk_rope_head_dim`);
* `rope_theta` for sliding-window layers, `compress_rope_theta` plus `rope_scaling` /
  `rope_parameters` (YaRN) for the compressed ones. HF applies YaRN only to CSA/HCA
  layers and forces YaRN's cos/sin amplitude to 1 there (docs/v4.md).

Sizes: DeepSeek V4 report as quoted in the HF blog (V4-Flash 284B / 13B, V4-Pro
1.6T / 49B), HF `DeepseekV4Config` defaults (Flash), and published config copies for
the per-layer schedules and YaRN settings (docs/v4.md lists which is which).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moeforge.config import (
    V4_ATTENTION_TYPES,
    V4_MLP_TYPES,
    AttentionConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    RopeConfig,
    V4Config,
)

_RATIO_TO_TYPE = {0: "sliding_attention", 1: "sliding_attention", 4: "compressed_sparse_attention",
                  128: "heavily_compressed_attention"}


def validate_v4(cfg: ModelConfig, need: Callable[[bool, str], None]) -> None:
    v, a, m, L = cfg.v4, cfg.attention, cfg.moe, cfg.num_layers
    assert v is not None
    need(len(v.layer_types) == L, f"v4.layer_types has {len(v.layer_types)} entries; num_layers is {L}")
    bad = sorted(set(v.layer_types) - set(V4_ATTENTION_TYPES))
    need(not bad, f"v4.layer_types entries {bad} are not among {V4_ATTENTION_TYPES}")
    need(len(v.mlp_layer_types) == L, f"v4.mlp_layer_types has {len(v.mlp_layer_types)} entries; num_layers is {L}")
    bad = sorted(set(v.mlp_layer_types) - set(V4_MLP_TYPES))
    need(not bad, f"v4.mlp_layer_types entries {bad} are not among {V4_MLP_TYPES}")
    need(a.q_lora_rank is not None, "DeepSeek-V4 attention needs a q_lora_rank (the indexer reads the q latent)")
    need(m.first_k_dense_replace == 0, "DeepSeek-V4 has no dense layers: set moe.first_k_dense_replace = 0")
    need(m.n_routed_experts > 0 and 0 < m.num_experts_per_tok <= m.n_routed_experts,
         "DeepSeek-V4 needs routed experts with 1 <= num_experts_per_tok <= n_routed_experts")
    for name in ("csa_compress_rate", "hca_compress_rate", "sliding_window", "head_dim", "index_n_heads",
                 "index_head_dim", "index_topk", "o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters"):
        need(getattr(v, name) >= 1, f"v4.{name} must be >= 1 (got {getattr(v, name)})")
    r = v.qk_rope_head_dim
    need(r % 2 == 0 and 0 < r <= min(v.head_dim, v.index_head_dim),
         f"v4.qk_rope_head_dim={r} must be even and at most head_dim={v.head_dim} and index_head_dim={v.index_head_dim}")
    need(a.num_heads * v.head_dim % v.o_groups == 0,
         f"num_heads * head_dim = {a.num_heads * v.head_dim} must be divisible by o_groups={v.o_groups}")
    need(v.compress_rope.type in ("default", "yarn"), f"v4.compress_rope type {v.compress_rope.type!r} is not supported")
    need(v.hc_eps >= 0 and v.swiglu_limit >= 0, "v4.hc_eps and v4.swiglu_limit must be >= 0")


# --------------------------------------------------------------------------- presets
def _v4(name: str, *, vocab: int, hidden: int, layers: int, heads: int, q_lora: int, experts: int, topk: int,
        inter: int, scale: float, v4: V4Config, mtp: int, max_pos: int, **top: Any) -> ModelConfig:
    return ModelConfig(
        name=name, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        max_position_embeddings=max_pos, **top,
        attention=AttentionConfig(num_heads=heads, q_lora_rank=q_lora, rope=RopeConfig(theta=10000.0, interleave=True)),
        moe=MoEConfig(n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=topk, moe_intermediate_size=inter,
                      n_group=1, topk_group=1, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
                      norm_topk_prob=True, routed_scaling_factor=scale, first_k_dense_replace=0),
        mtp=MTPConfig(num_layers=mtp),
        v4=v4,
    )


def _yarn16() -> RopeConfig:
    # published V4 configs: rope_scaling yarn, factor 16 over 65536, beta 32 / 1, compress_rope_theta 160000
    return RopeConfig(theta=160000.0, interleave=True, type="yarn", factor=16.0,
                      original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0, mscale=0.0,
                      mscale_all_dim=0.0)


def _tiny_v4() -> ModelConfig:
    # CPU-sized; every V4 feature on: all three attention types, hash + top-k MoE, hc_mult 4, MTP.
    L = 4
    return _v4("tiny-v4", vocab=4096, hidden=256, layers=L, heads=4, q_lora=96, experts=16, topk=4, inter=128,
               scale=1.5, mtp=1, max_pos=4096,
               v4=V4Config(layer_types=["sliding_attention", "compressed_sparse_attention",
                                        "heavily_compressed_attention", "compressed_sparse_attention"],
                           mlp_layer_types=["hash_moe"] + ["moe"] * (L - 1), csa_compress_rate=4,
                           hca_compress_rate=16, sliding_window=32, head_dim=64, qk_rope_head_dim=16,
                           index_n_heads=4, index_head_dim=32, index_topk=16, o_groups=2, o_lora_rank=64,
                           hc_mult=4, hc_sinkhorn_iters=20))


def _flash() -> ModelConfig:
    # HF DeepseekV4Config defaults; schedule from the published Flash config: 2 sliding, then CSA/HCA alternating
    L = 43
    types = ["sliding_attention"] * 2 + [
        "compressed_sparse_attention" if i % 2 == 0 else "heavily_compressed_attention" for i in range(L - 2)]
    return _v4("deepseek-v4-flash", vocab=129280, hidden=4096, layers=L, heads=64, q_lora=1024, experts=256, topk=6,
               inter=2048, scale=1.5, mtp=1, max_pos=1048576,
               v4=V4Config(layer_types=types, mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (L - 3),
                           head_dim=512, qk_rope_head_dim=64, index_n_heads=64, index_head_dim=128, index_topk=512,
                           o_groups=8, o_lora_rank=1024, compress_rope=_yarn16()))


def _pro() -> ModelConfig:
    # REFERENCE.md (published config copies [3P]); o_groups 16 from HF's grouped-projection docstring
    L = 61
    types = ["heavily_compressed_attention"] * 2 + [
        "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(L - 2)]
    return _v4("deepseek-v4-pro", vocab=129280, hidden=7168, layers=L, heads=128, q_lora=1536, experts=384, topk=6,
               inter=3072, scale=2.5, mtp=1, max_pos=1048576,
               v4=V4Config(layer_types=types, mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (L - 3),
                           head_dim=512, qk_rope_head_dim=64, index_n_heads=64, index_head_dim=128, index_topk=1024,
                           o_groups=16, o_lora_rank=1024, compress_rope=_yarn16()))


V4_PRESETS = {"tiny-v4": _tiny_v4, "deepseek-v4-flash": _flash, "deepseek-v4-pro": _pro}


# --------------------------------------------------------------------------- HF mapping
def _rope_from_hf(rp: dict[str, Any], theta: float) -> RopeConfig:
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    rope = RopeConfig(theta=float(theta), interleave=True, type=rtype)
    if rtype == "yarn":
        rope.factor = float(rp.get("factor") or 1.0)
        rope.original_max_position_embeddings = int(rp.get("original_max_position_embeddings") or 4096)
        rope.beta_fast = float(rp.get("beta_fast") or 32.0)
        rope.beta_slow = float(rp.get("beta_slow") or 1.0)
        rope.mscale, rope.mscale_all_dim = 0.0, 0.0  # HF V4 forces the YaRN amplitude to 1
    return rope


def v4_from_hf_dict(cls: type[ModelConfig], hf: dict[str, Any], name: str) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        v = hf.get(key, default)
        return default if v is None else v

    L = int(get("num_hidden_layers", 43))
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        try:
            types = [_RATIO_TO_TYPE[int(r)] for r in hf["compress_ratios"][:L]]
        except KeyError as e:
            raise ValueError(f"compress_ratios entry {e} is not one of 0, 4, 128") from None
    if types is None:  # HF default: 2 HCA, then HCA/CSA alternating
        types = ["heavily_compressed_attention"] * min(L, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(L - 2, 0))]
    mlp_types = hf.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = int(get("num_hash_layers", 3))
        mlp_types = ["hash_moe"] * min(L, n_hash) + ["moe"] * max(0, L - n_hash)
    rates = dict(get("compress_rates", {}))
    csa = int(rates.get("compressed_sparse_attention", get("compress_rate_csa", 4)))
    hca = int(rates.get("heavily_compressed_attention", get("compress_rate_hca", 128)))
    head_dim = int(get("head_dim", 512))
    if hf.get("partial_rotary_factor") is not None:
        rope_dim = int(head_dim * float(hf["partial_rotary_factor"]))
    else:
        rope_dim = int(get("qk_rope_head_dim", 64))
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    main_rp, comp_rp = (rp.get("main"), rp.get("compress")) if isinstance(rp.get("main"), dict) else ({}, rp)
    main_theta = (main_rp or {}).get("rope_theta", get("rope_theta", 10000.0))
    comp_theta = (comp_rp or {}).get("rope_theta", get("compress_rope_theta", 160000.0))
    if (main_rp or {}).get("rope_type", "default") != "default":
        raise ValueError("deepseek_v4: only plain RoPE is supported for the sliding-window ('main') layers")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    inter = int(get("moe_intermediate_size", 2048))
    mtp = int(get("num_nextn_predict_layers", 0))
    cfg = _v4(
        name, vocab=int(get("vocab_size", 129280)), hidden=int(get("hidden_size", 4096)), layers=L,
        heads=int(get("num_attention_heads", 64)), q_lora=int(get("q_lora_rank", 1024)),
        experts=int(get("n_routed_experts", 256)), topk=int(get("num_experts_per_tok", 6)), inter=inter,
        scale=float(get("routed_scaling_factor", 1.5)), mtp=mtp, max_pos=int(get("max_position_embeddings", 1048576)),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        initializer_range=float(get("initializer_range", 0.02)), hidden_act=get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
        v4=V4Config(layer_types=list(types)[:L], mlp_layer_types=list(mlp_types)[:L], csa_compress_rate=csa,
                    hca_compress_rate=hca, sliding_window=int(get("sliding_window", 128)), head_dim=head_dim,
                    qk_rope_head_dim=rope_dim, index_n_heads=int(get("index_n_heads", 64)),
                    index_head_dim=int(get("index_head_dim", 128)), index_topk=int(get("index_topk", 512)),
                    o_groups=int(get("o_groups", 8)), o_lora_rank=int(get("o_lora_rank", 1024)),
                    compress_rope=_rope_from_hf(comp_rp or {}, comp_theta), hc_mult=int(get("hc_mult", 4)),
                    hc_sinkhorn_iters=int(get("hc_sinkhorn_iters", 20)), hc_eps=float(get("hc_eps", 1e-6)),
                    swiglu_limit=float(get("swiglu_limit", 10.0))),
    )
    cfg.attention.rope.theta = float(main_theta)  # the sliding-window layers' own RoPE base
    cfg.moe.scoring_func = get("scoring_func", "sqrtsoftplus")
    cfg.moe.norm_topk_prob = bool(get("norm_topk_prob", True))
    return cfg.validate()


def v4_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    v, a, m = cfg.v4, cfg.attention, cfg.moe
    assert v is not None
    cr = v.compress_rope
    compress: dict[str, Any] = {"rope_type": cr.type, "rope_theta": cr.theta}
    if cr.type == "yarn":
        compress.update(factor=cr.factor, original_max_position_embeddings=cr.original_max_position_embeddings,
                        beta_fast=cr.beta_fast, beta_slow=cr.beta_slow)
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "moe_intermediate_size": m.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": 1,
        "head_dim": v.head_dim,
        "partial_rotary_factor": v.qk_rope_head_dim / v.head_dim,
        "q_lora_rank": a.q_lora_rank,
        "num_experts_per_tok": m.num_experts_per_tok,
        "n_routed_experts": m.n_routed_experts,
        "n_shared_experts": m.n_shared_experts,
        "scoring_func": m.scoring_func,
        "norm_topk_prob": m.norm_topk_prob,
        "routed_scaling_factor": m.routed_scaling_factor,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": a.rope.theta,
        "compress_rope_theta": cr.theta,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": a.rope.theta,
                                     "partial_rotary_factor": v.qk_rope_head_dim / v.head_dim},
                            "compress": {**compress, "partial_rotary_factor": v.qk_rope_head_dim / v.head_dim,
                                         **({"attention_factor": 1.0} if cr.type == "yarn" else {})}},
        "layer_types": list(v.layer_types),
        "compress_rates": {"compressed_sparse_attention": v.csa_compress_rate,
                           "heavily_compressed_attention": v.hca_compress_rate},
        "mlp_layer_types": list(v.mlp_layer_types),
        "hc_mult": v.hc_mult,
        "hc_sinkhorn_iters": v.hc_sinkhorn_iters,
        "hc_eps": v.hc_eps,
        "swiglu_limit": v.swiglu_limit,
        "sliding_window": v.sliding_window,
        "o_groups": v.o_groups,
        "o_lora_rank": v.o_lora_rank,
        "index_n_heads": v.index_n_heads,
        "index_head_dim": v.index_head_dim,
        "index_topk": v.index_topk,
        "num_nextn_predict_layers": cfg.mtp.num_layers,
        "hidden_act": cfg.hidden_act,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "torch_dtype": "float32",
    }
