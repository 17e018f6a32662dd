"""Sizes and costs of a model from its `ModelConfig` alone: the one place they are counted.

`moeforge info`, the trainer's MFU and the capacity planner all call this module, and
tests/test_accounting.py checks every count against a model built on the `meta` device,
parameter for parameter. Nothing here builds a model.

Parameter convention (what `total_params` / `active_params` mean)
------------------------------------------------------------------
* Headline figures are the **main model, including the embedding and the output head,
  excluding the MTP modules**. This is how DeepSeek quotes V3 (671B total / 37B active;
  a direct count gives 671.03B / 37.55B). The MTP modules are reported separately and
  in `*_with_mtp` figures (V3: +14B; the HF files hold 685B = main + MTP).
* A tied head (`tie_word_embeddings`) adds 0 parameters: it is the embedding matrix.
* The MTP modules share the main embedding and head, so those are not counted again.
* Active per token: routed experts count `num_experts_per_tok / n_routed_experts` of
  their parameters; everything else (embedding included, as in DeepSeek's figure) is
  active for every token.
* The router's `e_score_correction_bias` is a buffer, not a parameter: it is reported
  on its own (`router_bias_buffer`) and is in none of the totals.

Components: embedding, head, attention (MLA projections, their biases when
`attention_bias`, and the q / kv latent RMSNorms), dense_mlp (the first
`first_k_dense_replace` layers), shared_experts, routed_experts, router (gate weight),
norms (the two block norms of each layer and the final norm), mtp (everything inside the
MTP modules: enorm, hnorm, eh_proj, their attention + MoE block, their output norm).

FLOPs per token (one multiply-add = 2 FLOPs)
--------------------------------------------
Let P_mm be the active matmul weights of the main model: the attention projections,
the active FFN weights, the router and the head (counted even when tied, because the
head matmul runs either way); the embedding lookup, norms and biases are not matmuls.
L layers, H heads, d_qk = qk_nope_head_dim + qk_rope_head_dim, d_v = v_head_dim,
C = kv_lora_rank, R = qk_rope_head_dim.

* forward (training / prefill, naive MLA) at sequence length T:
      F_fwd = 2 P_mm + L * 2 H (d_qk + d_v) * T/2
  The attention term is QK^T (2 H d_qk per key) plus attention-weighted V (2 H d_v per
  key) over the T/2 keys a token sees on average under a causal mask.
* training: F_train = 3 F_fwd (the backward pass costs twice the forward).
  `with_mtp` adds, per MTP module: 2 (eh_proj + block matmuls + head) plus its attention
  term (the shared head runs once more per module).
* decode at context S (absorbed MLA over the cached latents, one new token):
      F_dec = 2 P_mm + L * [2 H (C + R) S + 2 H C S]
  scores over S cached (latent, rope-key) pairs and values over S latents. The
  absorption matmuls (q_nope -> latent through W_UK, latent output -> V through W_UV)
  cost H (d_nope + d_v) C multiply-adds per token: exactly the kv_b_proj weights, which
  are therefore already in P_mm.

These are the usual "model FLOPs" (as in MFU): no recomputation, softmax, norms or
routing overheads. Routing imbalance does not change them: each token always goes to
exactly `num_experts_per_tok` experts, only which ones varies.

KV cache per token
------------------
MLA caches the normalised latent plus the shared rotary key: L (C + R) values per token
(V3: 61 x 576 = 35,136 values = 70,272 bytes in bf16). Full per-head K and V would need
L H (d_qk + d_v) values (V3: 61 x 40,960). MTP layers are not counted (they only need a
cache when drafting speculatively).

DeepSeek-V4 configs (`cfg.v4` set) are counted by moeforge/accounting_v4.py, which the
public functions here dispatch to; its docstring lists the V4 components and cache.
"""

from __future__ import annotations

from typing import Any

from moeforge import accounting_v4 as _v4
from moeforge.config import ModelConfig

MAIN_COMPONENTS = (
    "embedding", "head", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms",
)
MTP_COMPONENTS = ("eh_proj", "attention", "shared_experts", "routed_experts", "router", "norms")

CONVENTION = (
    "total_params / active_params: main model including embedding and output head, excluding MTP modules "
    "(DeepSeek's 671B / 37B convention for V3); *_with_mtp add the MTP modules (embedding and head are shared, "
    "counted once). Active = num_experts_per_tok of n_routed_experts routed experts + everything else. "
    "A tied head adds 0. router_bias_buffer (e_score_correction_bias) is a non-trainable buffer, in no total."
)
FLOPS_CONVENTION = (
    "model FLOPs per token, 2 per multiply-add. forward = 2 x active matmul weights (embedding lookup excluded, "
    "head included) + attention 2*H*(qk_head_dim+v_head_dim)*seq_len/2 per layer (causal average); "
    "train = 3 x forward. decode = 2 x active matmul weights + absorbed MLA attention over `context` cached "
    "latents: 2*H*(kv_lora_rank+qk_rope_head_dim)*ctx + 2*H*kv_lora_rank*ctx per layer."
)


# ------------------------------------------------------------------ per-layer pieces
def _attention_weights(cfg: ModelConfig) -> int:
    """Matmul weights of one MLA layer (no biases, no norms)."""
    a, d = cfg.attention, cfg.hidden_size
    h, c, r = a.num_heads, a.kv_lora_rank, a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q = d * h * a.qk_head_dim
    else:
        q = d * a.q_lora_rank + a.q_lora_rank * h * a.qk_head_dim
    kv = d * (c + r) + c * h * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + h * a.v_head_dim * d


def _attention_params(cfg: ModelConfig) -> int:
    """All parameters of one MLA layer: weights, biases (q_a, kv_a, o), latent norms."""
    a, d = cfg.attention, cfg.hidden_size
    n = _attention_weights(cfg) + a.kv_lora_rank  # kv_a_layernorm
    if a.q_lora_rank is not None:
        n += a.q_lora_rank  # q_a_layernorm
    if a.attention_bias:
        n += (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim + d  # q_a (if any), kv_a, o biases
    return n


def _moe_parts(cfg: ModelConfig) -> dict[str, int]:
    """One MoE layer: (total) shared, routed, router weights; routed active; bias buffer."""
    m, d = cfg.moe, cfg.hidden_size
    expert = 3 * d * m.moe_intermediate_size  # SwiGLU: gate, up, down
    return {
        "shared": m.n_shared_experts * expert,
        "routed": m.n_routed_experts * expert,
        "routed_active": m.num_experts_per_tok * expert,
        "router": m.n_routed_experts * d,
        "bias": m.n_routed_experts if m.has_bias else 0,
    }


def _tc(total: int, active: int | None = None) -> dict[str, int]:
    return {"total": int(total), "active": int(total if active is None else active)}


# ------------------------------------------------------------------ parameters
def count_params(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts by component (each `{total, active}`), for the main model and the MTP modules.

    Returns `components` (main model), `mtp_components` (all MTP modules together),
    `total_params`, `active_params` (main, headline), `mtp_params`, `mtp_active_params`,
    `total_params_with_mtp`, `active_params_with_mtp` and `router_bias_buffer`.
    """
    if cfg.v4 is not None:
        return _v4.count_params(cfg)
    d, L, Lk = cfg.hidden_size, cfg.num_layers, cfg.moe.first_k_dense_replace
    n_moe, n_mtp = cfg.num_moe_layers, cfg.mtp.num_layers
    moe = _moe_parts(cfg) if (n_moe or n_mtp) else dict.fromkeys(("shared", "routed", "routed_active", "router", "bias"), 0)
    emb = cfg.vocab_size * d
    comp = {
        "embedding": _tc(emb),
        "head": _tc(0 if cfg.tie_word_embeddings else emb),
        "attention": _tc(L * _attention_params(cfg)),
        "dense_mlp": _tc(Lk * 3 * d * cfg.intermediate_size),
        "shared_experts": _tc(n_moe * moe["shared"]),
        "routed_experts": _tc(n_moe * moe["routed"], n_moe * moe["routed_active"]),
        "router": _tc(n_moe * moe["router"]),
        "norms": _tc((2 * L + 1) * d),
    }
    mtp = {
        "eh_proj": _tc(n_mtp * 2 * d * d),
        "attention": _tc(n_mtp * _attention_params(cfg)),
        "shared_experts": _tc(n_mtp * moe["shared"]),
        "routed_experts": _tc(n_mtp * moe["routed"], n_mtp * moe["routed_active"]),
        "router": _tc(n_mtp * moe["router"]),
        "norms": _tc(n_mtp * 5 * d),  # enorm, hnorm, two block norms, output norm
    }
    total = sum(c["total"] for c in comp.values())
    active = sum(c["active"] for c in comp.values())
    mtp_total = sum(c["total"] for c in mtp.values())
    mtp_active = sum(c["active"] for c in mtp.values())
    return {
        "components": comp,
        "mtp_components": mtp,
        "total_params": total,
        "active_params": active,
        "mtp_params": mtp_total,
        "mtp_active_params": mtp_active,
        "total_params_with_mtp": total + mtp_total,
        "active_params_with_mtp": active + mtp_active,
        "router_bias_buffer": (n_moe + n_mtp) * moe["bias"],
    }


def active_matmul_params(cfg: ModelConfig, with_mtp: bool = False) -> int:
    """Matmul weights one token passes through: attention, active FFN, router, head (even when tied).

    With `with_mtp`, each MTP module adds eh_proj, its block's matmuls and one more pass
    through the shared head.
    """
    if cfg.v4 is not None:
        return _v4.active_matmul_params(cfg, with_mtp)
    d, L = cfg.hidden_size, cfg.num_layers
    moe = _moe_parts(cfg) if (cfg.num_moe_layers or cfg.mtp.num_layers) else None
    moe_active = 0 if moe is None else moe["shared"] + moe["routed_active"] + moe["router"]
    head = cfg.vocab_size * d
    n = L * _attention_weights(cfg) + cfg.moe.first_k_dense_replace * 3 * d * cfg.intermediate_size
    n += cfg.num_moe_layers * moe_active + head
    if with_mtp:
        n += cfg.mtp.num_layers * (2 * d * d + _attention_weights(cfg) + moe_active + head)
    return n


# ------------------------------------------------------------------ FLOPs
def _check_len(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")


def attention_flops_per_token(cfg: ModelConfig, keys: float) -> float:
    """Naive-MLA scores + values for one token in one layer attending over `keys` keys."""
    a = cfg.attention
    return 2.0 * a.num_heads * (a.qk_head_dim + a.v_head_dim) * keys


def flops_per_token_forward(cfg: ModelConfig, seq_len: int, with_mtp: bool = False) -> float:
    """Forward FLOPs per token at causal sequence length `seq_len` (see the module docstring)."""
    _check_len("seq_len", seq_len, 1)
    if cfg.v4 is not None:
        return _v4.flops_per_token_forward(cfg, seq_len, with_mtp)
    layers = cfg.num_layers + (cfg.mtp.num_layers if with_mtp else 0)
    return 2.0 * active_matmul_params(cfg, with_mtp) + layers * attention_flops_per_token(cfg, seq_len / 2)


def flops_per_token_train(cfg: ModelConfig, seq_len: int, with_mtp: bool = False) -> float:
    """Training FLOPs per token: 3 x forward (forward + backward), main model unless `with_mtp`."""
    return 3.0 * flops_per_token_forward(cfg, seq_len, with_mtp)


def flops_per_token_decode(cfg: ModelConfig, context: int) -> float:
    """FLOPs to decode one token over `context` cached tokens with absorbed MLA (main model, no MTP)."""
    _check_len("context", context, 0)
    if cfg.v4 is not None:
        return _v4.flops_per_token_decode(cfg, context)
    a = cfg.attention
    c, r, h = a.kv_lora_rank, a.qk_rope_head_dim, a.num_heads
    attn = 2.0 * h * (c + r) * context + 2.0 * h * c * context
    return 2.0 * active_matmul_params(cfg) + cfg.num_layers * attn


# ------------------------------------------------------------------ KV cache
def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """MLA latent cache: num_layers x (kv_lora_rank + qk_rope_head_dim) values of `dtype_bytes` each.

    V4: the growing part (compressed + indexer keys), rounded to whole bytes."""
    if cfg.v4 is not None:
        return round(_v4.kv_cache_bytes_per_token(cfg, dtype_bytes))
    a = cfg.attention
    return cfg.num_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * dtype_bytes


def kv_cache_bytes_per_token_full(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """What per-head K and V would need: num_layers x num_heads x (qk_head_dim + v_head_dim) values.

    V4: its single K = V head per token and layer, uncompressed and unwindowed."""
    if cfg.v4 is not None:
        return cfg.num_layers * cfg.v4.head_dim * dtype_bytes
    a = cfg.attention
    return cfg.num_layers * a.num_heads * (a.qk_head_dim + a.v_head_dim) * dtype_bytes


# ------------------------------------------------------------------ summary
def summarize(cfg: ModelConfig, context: int = 4096, seq_len: int | None = None) -> dict[str, Any]:
    """Everything above as one JSON-ready dict. `seq_len` (training) defaults to `context`."""
    seq_len = context if seq_len is None else seq_len
    _check_len("context", context, 0)
    _check_len("seq_len", seq_len, 1)
    p = count_params(cfg)
    a, m = cfg.attention, cfg.moe
    out = {
        "config": cfg.name,
        "convention": CONVENTION,
        "flops_convention": FLOPS_CONVENTION,
        "architecture": {
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_heads": a.num_heads, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
            "dense_layers": m.first_k_dense_replace, "moe_layers": cfg.num_moe_layers,
            "n_routed_experts": m.n_routed_experts, "n_shared_experts": m.n_shared_experts,
            "num_experts_per_tok": m.num_experts_per_tok, "mtp_layers": cfg.mtp.num_layers,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "total_params": p["total_params"],
        "active_params": p["active_params"],
        "mtp_params": p["mtp_params"],
        "mtp_active_params": p["mtp_active_params"],
        "total_params_with_mtp": p["total_params_with_mtp"],
        "active_params_with_mtp": p["active_params_with_mtp"],
        "router_bias_buffer": p["router_bias_buffer"],
        "components": p["components"],
        "mtp_components": p["mtp_components"],
        "seq_len": seq_len,
        "context": context,
        "flops_per_token_forward": flops_per_token_forward(cfg, seq_len),
        "flops_per_token_train": flops_per_token_train(cfg, seq_len),
        "flops_per_token_train_with_mtp": flops_per_token_train(cfg, seq_len, with_mtp=True),
        "flops_per_token_decode": flops_per_token_decode(cfg, context),
        "kv_cache_dtype_bytes": 2,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "kv_cache_bytes_per_token_full_kv": kv_cache_bytes_per_token_full(cfg),
    }
    if cfg.v4 is not None:
        out["v4"] = _v4.summary_extra(cfg, context)
        out["active_params_excl_embedding"] = p["active_params"] - p["components"]["embedding"]["total"]
    return out


def human(n: float, unit: str = "") -> str:
    """671030000000 -> '671.0B'; FLOPs with unit='FLOP' -> '2.3 TFLOP'-style SI prefixes."""
    if unit:
        for div, pre in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(n) >= div:
                return f"{n / div:.2f} {pre}{unit}"
        return f"{n:.0f} {unit}"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}" if suf == "T" else f"{n / div:.1f}{suf}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for div, suf in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suf}"
    return f"{n:.0f} B"


def print_summary(summary: dict[str, Any]) -> None:
    """A readable table of `summarize`'s output (rich)."""
    from rich.console import Console
    from rich.table import Table

    s = summary
    t = Table(title=f"{s['config']}: parameters by component", title_justify="left")
    t.add_column("component")
    t.add_column("total", justify="right")
    t.add_column("active / token", justify="right")
    for name, c in s["components"].items():
        t.add_row(name, human(c["total"]), human(c["active"]))
    t.add_section()
    t.add_row("[bold]main model[/bold] (headline)", f"[bold]{human(s['total_params'])}[/bold]",
              f"[bold]{human(s['active_params'])}[/bold]")
    if s["mtp_params"]:
        t.add_row(f"mtp modules ({s['architecture']['mtp_layers']})", human(s["mtp_params"]),
                  human(s["mtp_active_params"]))
        t.add_row("with mtp", human(s["total_params_with_mtp"]), human(s["active_params_with_mtp"]))
    if s["router_bias_buffer"]:
        t.add_row("router bias (buffer, not trained)", human(s["router_bias_buffer"]), "")

    c = Table(title="cost per token", title_justify="left")
    c.add_column("figure")
    c.add_column("value", justify="right")
    c.add_row(f"train FLOPs (seq {s['seq_len']})", human(s["flops_per_token_train"], "FLOP"))
    if s["mtp_params"]:
        c.add_row(f"train FLOPs with MTP (seq {s['seq_len']})", human(s["flops_per_token_train_with_mtp"], "FLOP"))
    c.add_row(f"decode FLOPs (context {s['context']})", human(s["flops_per_token_decode"], "FLOP"))
    kv, full = s["kv_cache_bytes_per_token"], s["kv_cache_bytes_per_token_full_kv"]
    if "v4" in s:
        v4 = s["v4"]
        for kind, b in v4["kv_bytes_per_token_by_layer_type"].items():
            short = {"sliding_attention": "sliding", "compressed_sparse_attention": "CSA"}.get(kind, "HCA")
            c.add_row(f"KV / token, one {short} layer (bf16)",
                      f"{b:g} B (x{v4['layer_type_counts'][kind]} layers)" + (
                          f" + window {human_bytes(v4['window_bytes_per_layer'])}" if kind == "sliding_attention" else ""))
        c.add_row("KV / token, all layers (growing part, bf16)", f"{kv:,} B")
        c.add_row("V4 cache at 1M tokens (bf16, incl. windows)", human_bytes(v4["v4_cache_bytes_at_1m"]))
        c.add_row("MLA (V3 latent) at 1M tokens, same layer count",
                  f"{human_bytes(v4['mla_cache_bytes_at_1m_same_layers'])} "
                  f"({v4['mla_cache_bytes_at_1m_same_layers'] / v4['v4_cache_bytes_at_1m']:.1f}x)")
        c.add_row("DeepSeek-V3 (61-layer MLA) at 1M tokens",
                  f"{human_bytes(v4['v3_cache_bytes_at_1m'])} ({v4['v3_cache_bytes_at_1m'] / v4['v4_cache_bytes_at_1m']:.1f}x)")
    else:
        c.add_row("KV cache, MLA latent (bf16)", f"{kv:,} B ({human_bytes(kv)})")
        c.add_row("KV cache, full per-head K/V (bf16)", f"{full:,} B ({human_bytes(full)}, {full / kv:.0f}x)")
    console = Console()
    console.print(t)
    console.print(c)
    console.print(f"[dim]{s['convention']}[/dim]")
