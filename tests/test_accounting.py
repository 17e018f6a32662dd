"""accounting.py against models built on the meta device, published sizes and a FLOP counter."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moeforge import accounting as acc
from moeforge.config import PRESETS, get_preset
from moeforge.model import build_model
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.ops import routed
from moeforge.ops.attention import explicit_pays


def _variants() -> dict[str, object]:
    cfgs = {name: get_preset(name) for name in PRESETS}
    cfgs["tiny-no-q-lora"] = get_preset("tiny").replace(**{"attention.q_lora_rank": None})
    cfgs["tiny-tied"] = get_preset("tiny").replace(tie_word_embeddings=True)
    cfgs["tiny-mtp2"] = get_preset("tiny").replace(**{"mtp.num_layers": 2})
    cfgs["tiny-all-dense"] = get_preset("tiny").replace(**{"moe.first_k_dense_replace": 4, "mtp.num_layers": 0})
    cfgs["tiny-bias-v2-router"] = get_preset("tiny").replace(
        **{"attention.attention_bias": True, "moe.topk_method": "greedy", "moe.scoring_func": "softmax"}
    )
    return cfgs


VARIANTS = _variants()


def _component(name: str) -> tuple[str, str]:
    """Parameter name -> (main | mtp, component), by name pattern."""
    where = "mtp" if name.startswith("mtp.") else "main"
    rules = (
        ("embed_tokens.", "embedding"), ("lm_head.", "head"), ("eh_proj.", "eh_proj"),
        (".self_attn.", "attention"), (".mlp.gate.", "router"), (".mlp.experts.", "routed_experts"),
        (".mlp.shared_experts.", "shared_experts"), (".mlp.", "dense_mlp"),
        ("_hc.", "hyper_connections"), ("hc_head.", "hyper_connections"),
    )
    for pattern, comp in rules:
        if pattern in name or name.startswith(pattern):
            return where, comp
    assert name.endswith("norm.weight"), name  # everything else must be an RMSNorm
    return where, "norms"


def _meta_counts(cfg) -> tuple[dict, dict, int]:
    with torch.device("meta"):
        model = build_model(cfg)
    counts: dict[str, dict[str, dict[str, int]]] = {"main": {}, "mtp": {}}
    for name, p in model.named_parameters():  # a tied head appears once, as embed_tokens
        where, comp = _component(name)
        c = counts[where].setdefault(comp, {"total": 0, "active": 0})
        c["total"] += p.numel()
        if comp == "routed_experts":  # (E, ...) fused weights: top-k of E experts are active
            assert p.numel() * cfg.moe.num_experts_per_tok % p.shape[0] == 0
            c["active"] += p.numel() * cfg.moe.num_experts_per_tok // p.shape[0]
        else:
            c["active"] += p.numel()
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return counts["main"], counts["mtp"], buffers


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_match_meta_model(name):
    cfg = VARIANTS[name]
    main, mtp, buffers = _meta_counts(cfg)
    p = acc.count_params(cfg)
    nonzero = lambda d: {k: v for k, v in d.items() if v["total"]}
    assert nonzero(p["components"]) == main
    assert nonzero(p["mtp_components"]) == mtp
    assert p["router_bias_buffer"] == buffers
    assert p["total_params"] == sum(c["total"] for c in main.values())
    assert p["mtp_params"] == sum(c["total"] for c in mtp.values())
    # the headline excludes MTP; the MTP figure is everything under `mtp.` (shared embedding/head not repeated)
    assert p["total_params_with_mtp"] == p["total_params"] + p["mtp_params"]


def test_variants_exercise_the_branches():
    p = acc.count_params(VARIANTS["tiny-tied"])
    assert p["components"]["head"] == {"total": 0, "active": 0}
    p = acc.count_params(VARIANTS["tiny-all-dense"])
    assert p["components"]["routed_experts"]["total"] == 0 and p["mtp_params"] == 0
    assert p["total_params"] == p["active_params"]
    assert acc.count_params(VARIANTS["tiny-bias-v2-router"])["router_bias_buffer"] == 0
    two, one = acc.count_params(VARIANTS["tiny-mtp2"]), acc.count_params(get_preset("tiny"))
    assert two["mtp_params"] == 2 * one["mtp_params"]


def test_deepseek_v3_published_sizes():
    p = acc.count_params(get_preset("deepseek-v3"))
    # REFERENCE.md: a direct count gives 671.03B total, 37.55B active (incl. embedding and head)
    assert abs(p["total_params"] - 671.0e9) / 671.0e9 < 0.003
    assert 36.5e9 <= p["active_params"] <= 38.0e9  # the 37.55B direct count, incl. embedding and head
    assert round(p["total_params"] / 1e7) == 67103 and round(p["active_params"] / 1e7) == 3755
    # HF files: 685B = main + MTP layer (11.6B) + the MTP layer's stored copies of embedding and head
    emb = p["components"]["embedding"]["total"]
    assert 684e9 < p["total_params_with_mtp"] + 2 * emb < 685e9
    assert 11e9 < p["mtp_params"] < 12e9


def test_v2_lite_and_kimi_k2_published_sizes():
    p = acc.count_params(get_preset("deepseek-v2-lite"))
    assert 15.6e9 < p["total_params"] < 15.8e9  # "16B" (15.7B in the V2 report)
    # "2.4B active": our active includes embedding and head (2.66B); without the embedding, 2.45B
    assert 2.6e9 < p["active_params"] < 2.7e9
    assert 2.35e9 < p["active_params"] - p["components"]["embedding"]["total"] < 2.5e9
    assert p["mtp_params"] == 0
    p = acc.count_params(get_preset("kimi-k2"))
    assert 1.0e12 < p["total_params"] < 1.05e12 and 32e9 < p["active_params"] < 33.5e9  # "1T / 32B"


def test_kv_cache():
    v3 = get_preset("deepseek-v3")
    assert acc.kv_cache_bytes_per_token(v3) == 70_272
    assert acc.kv_cache_bytes_per_token(v3, dtype_bytes=1) == 35_136
    assert acc.kv_cache_bytes_per_token_full(v3) == 61 * 128 * (192 + 128) * 2


# ------------------------------------------------------------------ FLOPs
def _counted(model, ids, **kw) -> int:
    # The math SDPA backend decomposes attention into bmm that the counter sees (CPU's fused
    # kernel is invisible to it); it computes the full T x T score matrix, causal mask or not.
    # The fused routed experts pad each segment with zero rows for oneDNN's kernel cache where
    # products run on oneDNN: count the model's products, not that padding.
    with (sdpa_kernel(SDPBackend.MATH), patch.object(routed, "row_bucket", lambda t: 1),
          FlopCounterMode(display=False) as fc):
        out = model(ids, **kw)
    return fc.get_total_flops(), out


# The gate-weighted sum of the K expert outputs (2*K*D per token per MoE layer, ~0.1% here)
# is not a weight matmul: the counter sees it only when the MoE block writes it as an einsum
# (bmm) rather than a multiply-and-sum, so the comparisons leave room for it.
COMBINE_REL = 2e-3


@pytest.mark.parametrize("name", ["tiny", "tiny-no-q-lora", "tiny-tied"])
def test_forward_flops_match_counter(name):
    cfg = VARIANTS[name]
    model = Transformer(cfg)
    B, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counted, _ = _counted(model, ids, mtp=False)
    # The one systematic difference: the counter charges full-square attention, our causal
    # formula half of it (the average key count under the mask). Routing varies which
    # experts run, never how many (each token always hits exactly K), so the routed-expert
    # FLOPs are exact, not an expectation.
    ours = B * T * acc.flops_per_token_forward(cfg, T)
    masked_half = B * T * cfg.num_layers * acc.attention_flops_per_token(cfg, T / 2)
    # MLA zero-pads V to the key width where it runs SDPA (for its fused kernel): the counter sees that too.
    # Short fp32 sequences on CPU take the explicit GEMMs instead (moeforge.ops.attention), unpadded.
    a = cfg.attention
    sdpa = not explicit_pays(torch.empty(B, a.num_heads, T, a.qk_head_dim), T)
    padding = sdpa * B * T * cfg.num_layers * 2 * a.num_heads * max(0, a.qk_head_dim - a.v_head_dim) * T
    assert counted >= ours + masked_half + padding
    assert counted == pytest.approx(ours + masked_half + padding, rel=COMBINE_REL)
    assert masked_half / counted < 0.02  # at T = 64 the attention conventions differ by ~1%


def test_mtp_flops_match_counter():
    cfg = VARIANTS["tiny-mtp2"]
    model = Transformer(cfg)
    B, T = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    main, _ = _counted(model, ids, mtp=False)
    both, _ = _counted(model, ids, mtp=True)
    # MTP depth k runs on T-k tokens: eh_proj, its block, the shared head, attention over T-k keys
    per_module = (acc.flops_per_token_forward(cfg, 2, with_mtp=True) - acc.flops_per_token_forward(cfg, 2)) / 2
    per_module -= acc.attention_flops_per_token(cfg, 1)  # the per-token attention term at seq 2 (2/2 keys)
    expected = sum(
        B * (T - k) * (per_module + acc.attention_flops_per_token(cfg, T - k)) for k in (1, 2)
    )
    assert both - main == pytest.approx(expected, rel=COMBINE_REL)


def test_train_flops_are_three_forwards():
    cfg = get_preset("tiny")
    model = Transformer(cfg).train()
    B, T = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    fwd, _ = _counted(model, ids, mtp=False)
    with (sdpa_kernel(SDPBackend.MATH), patch.object(routed, "row_bucket", lambda t: 1),
          FlopCounterMode(display=False) as fc):
        model(ids, mtp=False).logits.float().sum().backward()
    assert fc.get_total_flops() == pytest.approx(3 * fwd, rel=1e-3)
    assert acc.flops_per_token_train(cfg, T) == 3 * acc.flops_per_token_forward(cfg, T)


def test_decode_flops_match_counter():
    cfg = get_preset("tiny")
    model = Transformer(cfg).eval()
    B, T = 2, 40
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        cache = model(ids, mtp=False, return_cache=True).cache
        # On 2+ threads two decode tokens of the tiny model run every expert on every token (MoE._dense_pays),
        # 4x the routed products by design: count the segment path, which runs what the formula counts.
        with patch.object(MoE, "_dense_pays", lambda self, n: False), FlopCounterMode(display=False) as fc:
            model(ids[:, -1:], start_pos=T, cache=cache, absorbed=True, mtp=False)
    # the new token attends over T cached + itself
    expected = B * acc.flops_per_token_decode(cfg, T + 1)
    assert fc.get_total_flops() == pytest.approx(expected, rel=COMBINE_REL)


def test_v3_flops_magnitudes():
    v3 = get_preset("deepseek-v3")
    # forward ~ 2 x active (minus the embedding lookup) plus attention; train = 3x
    p = acc.count_params(v3)
    mm = acc.active_matmul_params(v3)
    latent_norms = 61 * (1536 + 512)  # q_a_layernorm, kv_a_layernorm: in "attention", not matmuls
    assert mm == p["active_params"] - p["components"]["embedding"]["total"] - p["components"]["norms"]["total"] - latent_norms
    assert acc.flops_per_token_train(v3, 4096) == pytest.approx(6 * mm + 3 * 61 * 2 * 128 * 320 * 2048)
    assert acc.flops_per_token_decode(v3, 0) == 2 * mm
    with pytest.raises(ValueError, match="seq_len"):
        acc.flops_per_token_train(v3, 0)
    with pytest.raises(ValueError, match="context"):
        acc.flops_per_token_decode(v3, -1)


def test_summary_fields_and_table(capsys):
    s = acc.summarize(get_preset("deepseek-v3"), context=8192, seq_len=4096)
    for key in ("total_params", "active_params", "total_params_with_mtp", "active_params_with_mtp",
                "flops_per_token_train", "flops_per_token_decode", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_full_kv", "components", "convention", "config"):
        assert key in s
    assert s["config"] == "deepseek-v3" and s["context"] == 8192 and s["seq_len"] == 4096
    assert "excluding MTP" in s["convention"]
    acc.print_summary(s)
    out = capsys.readouterr().out
    assert "671.0B" in out and "37.6B" in out and "70,272" in out
    assert acc.human(1.026e12) == "1.03T" and acc.human(8_166_272) == "8.2M"
