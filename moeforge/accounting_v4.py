"""Sizes and costs of a DeepSeek-V4 model (`cfg.v4` set), called by `moeforge.accounting`.

Same conventions as moeforge/accounting.py (main model incl. embedding and head, MTP
separate; active = top-k of the routed experts + everything else; buffers in no total),
for the V4 modules of moeforge.model.v4 / v4_attention / hyper:

* attention: q_a (+ q_a_norm), q_b, the shared K=V projection kv_proj (+ kv_norm), the
  grouped output projection o_a (o_groups blocks) and o_b, the per-head sinks, and the
  compressors: HCA kv/gate (head_dim wide) + position bias + norm; CSA kv/gate
  (2 x head_dim: the two overlapping series) + position bias + norm, and its lightning
  indexer (its own 2 x index_head_dim compressor, q_b from the q latent, weights_proj);
* hyper_connections: per layer two mHC mappings ((2+n) n x n D weights, (2+n) n biases,
  3 scales) and the final hc_head (n x n D, n, 1);
* buffers: the router bias of top-k layers and the frozen hash table (vocab x top-k
  token -> expert ids) of hash layers; neither is a parameter.

KV cache (bf16 by default): per layer, a sliding-window layer keeps `sliding_window`
K=V vectors of head_dim (a constant per sequence); CSA adds one compressed key per
`csa_compress_rate` tokens (head_dim) plus one indexer key (index_head_dim); HCA one
compressed key per `hca_compress_rate` tokens. Per-token figures are those growing
parts; `v4_cache_bytes(cfg, context)` adds the window and the compressor state (the
not-yet-full window of projected kv/gate rows, and CSA's previous-window overlap).
"""

from __future__ import annotations

from typing import Any

from moeforge.config import ModelConfig


def _tc(total: int, active: int | None = None) -> dict[str, int]:
    return {"total": int(total), "active": int(total if active is None else active)}


def attention_weights(cfg: ModelConfig, layer_type: str) -> int:
    """Matmul weights of one V4 attention layer of `layer_type` (compressors and indexer included)."""
    v, a, d = cfg.v4, cfg.attention, cfg.hidden_size
    h, hd, qr = a.num_heads, v.head_dim, a.q_lora_rank
    n = d * qr + qr * h * hd + d * hd + v.o_lora_rank * h * hd + v.o_groups * v.o_lora_rank * d
    if layer_type == "heavily_compressed_attention":
        n += 2 * d * hd
    elif layer_type == "compressed_sparse_attention":
        di = v.index_head_dim
        n += 2 * d * 2 * hd + 2 * d * 2 * di + qr * v.index_n_heads * di + d * v.index_n_heads
    return n


def attention_params(cfg: ModelConfig, layer_type: str) -> int:
    """attention_weights plus norms (q_a_norm, kv_norm, compressor norms), sinks and position biases."""
    v, a = cfg.v4, cfg.attention
    n = attention_weights(cfg, layer_type) + a.q_lora_rank + v.head_dim + a.num_heads
    if layer_type == "heavily_compressed_attention":
        n += v.hca_compress_rate * v.head_dim + v.head_dim
    elif layer_type == "compressed_sparse_attention":
        m = v.csa_compress_rate
        n += m * 2 * v.head_dim + v.head_dim + m * 2 * v.index_head_dim + v.index_head_dim
    return n


def _hc_layer(cfg: ModelConfig) -> int:
    n, d = cfg.v4.hc_mult, cfg.hidden_size
    return 2 * ((2 + n) * n * n * d + (2 + n) * n + 3)


def _hc_head(cfg: ModelConfig) -> int:
    n, d = cfg.v4.hc_mult, cfg.hidden_size
    return n * n * d + n + 1


def _moe(cfg: ModelConfig) -> dict[str, int]:
    m, d = cfg.moe, cfg.hidden_size
    expert = 3 * d * m.moe_intermediate_size
    return {"shared": m.n_shared_experts * expert, "routed": m.n_routed_experts * expert,
            "routed_active": m.num_experts_per_tok * expert, "router": m.n_routed_experts * d}


def count_params(cfg: ModelConfig) -> dict[str, Any]:
    """Like accounting.count_params, with a `hyper_connections` component and `hash_table_buffer`."""
    v, d, L, n_mtp = cfg.v4, cfg.hidden_size, cfg.num_layers, cfg.mtp.num_layers
    moe = _moe(cfg)
    emb = cfg.vocab_size * d
    comp = {
        "embedding": _tc(emb),
        "head": _tc(0 if cfg.tie_word_embeddings else emb),
        "attention": _tc(sum(attention_params(cfg, t) for t in v.layer_types)),
        "shared_experts": _tc(L * moe["shared"]),
        "routed_experts": _tc(L * moe["routed"], L * moe["routed_active"]),
        "router": _tc(L * moe["router"]),
        "norms": _tc((2 * L + 1) * d),
        "hyper_connections": _tc(L * _hc_layer(cfg) + _hc_head(cfg)),
    }
    mtp = {  # each MTP module: eh_proj, a sliding-window V4 block with top-k MoE, its own hc_head
        "eh_proj": _tc(n_mtp * 2 * d * d),
        "attention": _tc(n_mtp * attention_params(cfg, "sliding_attention")),
        "shared_experts": _tc(n_mtp * moe["shared"]),
        "routed_experts": _tc(n_mtp * moe["routed"], n_mtp * moe["routed_active"]),
        "router": _tc(n_mtp * moe["router"]),
        "norms": _tc(n_mtp * 5 * d),
        "hyper_connections": _tc(n_mtp * (_hc_layer(cfg) + _hc_head(cfg))),
    }
    total, active = sum(c["total"] for c in comp.values()), sum(c["active"] for c in comp.values())
    mtp_total, mtp_active = sum(c["total"] for c in mtp.values()), sum(c["active"] for c in mtp.values())
    n_hash = sum(t == "hash_moe" for t in v.mlp_layer_types)
    return {
        "components": comp, "mtp_components": mtp,
        "total_params": total, "active_params": active,
        "mtp_params": mtp_total, "mtp_active_params": mtp_active,
        "total_params_with_mtp": total + mtp_total, "active_params_with_mtp": active + mtp_active,
        "router_bias_buffer": (L - n_hash + n_mtp) * cfg.moe.n_routed_experts,
        "hash_table_buffer": n_hash * cfg.vocab_size * cfg.moe.num_experts_per_tok,
    }


def active_matmul_params(cfg: ModelConfig, with_mtp: bool = False) -> int:
    """Attention (incl. compressor / indexer projections), mHC mappings, active FFN, router, head."""
    v, d = cfg.v4, cfg.hidden_size
    moe = _moe(cfg)
    ffn = moe["shared"] + moe["routed_active"] + moe["router"]
    hc = 2 * (2 + v.hc_mult) * v.hc_mult * v.hc_mult * d
    head = cfg.vocab_size * d
    n = sum(attention_weights(cfg, t) for t in v.layer_types) + cfg.num_layers * (ffn + hc)
    n += v.hc_mult * v.hc_mult * d + head
    if with_mtp:
        n += cfg.mtp.num_layers * (2 * d * d + attention_weights(cfg, "sliding_attention") + ffn + hc
                                   + v.hc_mult * v.hc_mult * d + head)
    return n


def _visible(cfg: ModelConfig, layer_type: str, pos: int) -> tuple[float, float, float]:
    """(window keys, attended compressed keys, indexer-scored compressed keys) of a query at `pos`."""
    v = cfg.v4
    win = min(pos + 1, v.sliding_window)
    if layer_type == "sliding_attention":
        return win, 0, 0
    ready = (pos + 1) // v.compress_rate(layer_type)
    if layer_type == "heavily_compressed_attention":
        return win, ready, 0
    return win, min(ready, v.index_topk), ready


def attention_flops(cfg: ModelConfig, layer_type: str, pos: int) -> float:
    """Scores + values (K = V, one shared head) and lightning-indexer scores for one query at `pos`."""
    v, h = cfg.v4, cfg.attention.num_heads
    win, comp, scored = _visible(cfg, layer_type, pos)
    return 4.0 * h * v.head_dim * (win + comp) + 2.0 * v.index_n_heads * v.index_head_dim * scored


def _mean_attention(cfg: ModelConfig, seq_len: int, types: list[str]) -> float:
    # exact causal average over positions 0..T-1, in closed form per position class would be
    # shorter but this stays obviously right; sample at most 4096 evenly spaced positions
    step = max(1, seq_len // 4096)
    pos = range(0, seq_len, step)
    return sum(sum(attention_flops(cfg, t, p) for p in pos) / len(pos) for t in types)


def flops_per_token_forward(cfg: ModelConfig, seq_len: int, with_mtp: bool = False) -> float:
    types = list(cfg.v4.layer_types) + (["sliding_attention"] * cfg.mtp.num_layers if with_mtp else [])
    return 2.0 * active_matmul_params(cfg, with_mtp) + _mean_attention(cfg, seq_len, types)


def flops_per_token_decode(cfg: ModelConfig, context: int) -> float:
    return 2.0 * active_matmul_params(cfg) + sum(attention_flops(cfg, t, context) for t in cfg.v4.layer_types)


# ------------------------------------------------------------------ KV cache
def kv_bytes_per_token_by_type(cfg: ModelConfig, dtype_bytes: int = 2) -> dict[str, float]:
    """Growing cache bytes per token of ONE layer of each attention type (window excluded: it is bounded)."""
    v = cfg.v4
    return {
        "sliding_attention": 0.0,
        "compressed_sparse_attention": (v.head_dim + v.index_head_dim) * dtype_bytes / v.csa_compress_rate,
        "heavily_compressed_attention": v.head_dim * dtype_bytes / v.hca_compress_rate,
    }


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> float:
    """Growing cache bytes per token, all layers (main model)."""
    per = kv_bytes_per_token_by_type(cfg, dtype_bytes)
    return sum(per[t] for t in cfg.v4.layer_types)


def v4_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> int:
    """Exact bytes of moeforge's V4 decode cache (moeforge.model.v4_attention.V4LayerCache) after `context` tokens."""
    v, d_h, d_i = cfg.v4, cfg.v4.head_dim, cfg.v4.index_head_dim
    n = 0
    for t in v.layer_types:
        n += min(context, v.sliding_window - 1) * d_h  # the window the next token will see besides itself
        if t == "sliding_attention":
            continue
        m = v.compress_rate(t)
        entries, pending = context // m, context % m
        if t == "heavily_compressed_attention":
            n += entries * d_h + pending * 2 * d_h  # entries + buffered kv/gate rows
        else:
            n += entries * (d_h + d_i) + pending * 2 * (2 * d_h + 2 * d_i)  # entries + buffered rows (2 series)
            n += (2 * m * (d_h + d_i)) if entries else 0  # previous window's overlap series (kv + gate)
    return n * dtype_bytes


def summary_extra(cfg: ModelConfig, context: int) -> dict[str, Any]:
    """V4-only entries of `moeforge info`: cache by attention type and the 1M-token comparison with MLA."""
    from moeforge.accounting import kv_cache_bytes_per_token as mla_bytes
    from moeforge.config import get_preset

    v = cfg.v4
    counts = {t: v.layer_types.count(t) for t in ("sliding_attention", "compressed_sparse_attention",
                                                   "heavily_compressed_attention")}
    million = 1 << 20
    mla_same = cfg.num_layers * (512 + 64) * 2  # V3's MLA latent + rope key per layer, over this model's layers
    return {
        "layer_type_counts": counts,
        "kv_bytes_per_token_by_layer_type": kv_bytes_per_token_by_type(cfg),
        "window_bytes_per_layer": v.sliding_window * v.head_dim * 2,
        "v4_cache_bytes_at_1m": v4_cache_bytes(cfg, million),
        "mla_cache_bytes_at_1m_same_layers": mla_same * million,
        "v3_cache_bytes_at_1m": mla_bytes(get_preset("deepseek-v3")) * million,
        "hash_table_buffer": count_params(cfg)["hash_table_buffer"],
    }
