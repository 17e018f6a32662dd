"""DeepSeek-V4 model pieces: decode cache vs full recompute, mHC, hash routing, accounting sizes."""

from __future__ import annotations

import pytest
import torch

from moeforge import accounting as acc
from moeforge.accounting_v4 import v4_cache_bytes
from moeforge.config import get_preset
from moeforge.model import build_model
from moeforge.model.hyper import sinkhorn, sinkhorn_reference


def _cfg():
    # window 5, CSA every 4, HCA every 8, top-2 index: 30 tokens cross all boundaries several times.
    # 16 indexer heads: with very few, ReLU makes exact-zero index scores common, and top-k among
    # tied entries is order-dependent (in HF too), so decode and recompute could pick different ones.
    return get_preset("tiny-v4").replace(vocab_size=200, hidden_size=48, **{
        "moe.moe_intermediate_size": 16, "moe.n_routed_experts": 8, "moe.num_experts_per_tok": 2,
        "v4.head_dim": 16, "v4.qk_rope_head_dim": 8, "v4.index_head_dim": 8, "v4.index_topk": 2, "v4.index_n_heads": 16,
        "v4.sliding_window": 5, "v4.hca_compress_rate": 8, "v4.o_lora_rank": 8, "v4.hc_mult": 3,
        "attention.q_lora_rank": 24})


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    return model.eval()


@pytest.mark.parametrize("prefill", [1, 7, 13])
def test_cached_decode_matches_full_recompute(prefill):
    model = _randomize(build_model(_cfg()))
    ids = torch.randint(0, 200, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, mtp=False).logits
        out = model(ids[:, :prefill], mtp=False, return_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(prefill, 30):
            out = model(ids[:, t : t + 1], start_pos=t, cache=cache, mtp=False, return_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4
    # only what the architecture needs: window - 1 vectors, entries, indexer keys, compressor state
    assert cache[0].window.shape[1] == 4 and cache[0].compressor is None
    assert cache[1].compressor.entries.shape[1] == 30 // 4 and cache[1].indexer.entries.shape[1] == 30 // 4
    assert cache[2].compressor.entries.shape[1] == 30 // 8 and cache[2].indexer is None
    assert cache[2].compressor.pending_kv.shape[1] == 30 % 8
    assert sum(c.nbytes() for c in cache) == 2 * v4_cache_bytes(model.cfg, 30, dtype_bytes=4)  # batch 2


def test_sinkhorn_is_doubly_stochastic():
    m = torch.rand(5, 4, 4) + 0.01
    p = sinkhorn(m, 20, 1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(5, 4), atol=1e-4)
    assert torch.allclose(p.sum(-2), torch.ones(5, 4), atol=1e-4)


@pytest.mark.parametrize("numpy_steps", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_equals_the_plain_steps_and_their_autograd_backward(dtype, numpy_steps, monkeypatch):
    from moeforge.model import hyper

    monkeypatch.setattr(hyper, "_on_numpy", lambda m: numpy_steps)  # CPU fp32 runs NumPy; other devices PyTorch
    g = torch.Generator().manual_seed(0)
    m = (3 * torch.rand(3, 7, 4, 4, generator=g, dtype=dtype)).softmax(-1).add(1e-6).requires_grad_()
    w = torch.randn(3, 7, 4, 4, generator=g, dtype=dtype)  # a loss that weights every entry differently
    ref = sinkhorn_reference(m, 20, 1e-6)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), m)
    out = sinkhorn(m, 20, 1e-6)
    (grad,) = torch.autograd.grad((out * w).sum(), m)
    assert torch.equal(out, ref)  # the same sums in the same order
    with torch.no_grad():
        assert torch.equal(sinkhorn(m, 20, 1e-6), ref)  # the inference path too
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad, ref_grad, atol=tol * ref_grad.abs().max().item(), rtol=0)
    assert grad.abs().max() > 1  # the loss reaches the input: not a vacuous comparison


def test_hash_table_is_a_saved_buffer_and_routes_by_token(tmp_path):
    import moeforge

    model = build_model(_cfg())
    gate = model.layers[0].mlp.gate
    assert "layers.0.mlp.gate.tid2eid" in model.state_dict() and gate.e_score_correction_bias is None
    rows = gate.tid2eid
    assert all(len(set(r.tolist())) == r.numel() for r in rows)  # K distinct experts per token
    moeforge.save_model(model, tmp_path / "m")
    back = moeforge.load_model(tmp_path / "m", device="cpu")
    assert torch.equal(back.layers[0].mlp.gate.tid2eid, rows)
    ids = torch.tensor([[3, 3, 7]])
    r = gate(torch.randn(3, 48), ids)
    assert torch.equal(r.indices[0], r.indices[1]) and torch.equal(r.indices[2], rows[7])
    with pytest.raises(ValueError, match="token ids"):
        model.layers[0].mlp(torch.randn(1, 3, 48))


def test_published_sizes():
    # convention: total = main model incl. embedding + head, excl. MTP (as V3's 671B);
    # active: excl. the embedding table (a lookup) -- see docs/v4.md
    flash, pro = acc.summarize(get_preset("deepseek-v4-flash")), acc.summarize(get_preset("deepseek-v4-pro"))
    assert abs(flash["total_params"] / 284e9 - 1) < 0.02
    assert abs(pro["total_params"] / 1.6e12 - 1) < 0.02
    assert abs(pro["active_params_excl_embedding"] / 49e9 - 1) < 0.02
    assert abs(flash["active_params_excl_embedding"] / 13e9 - 1) < 0.021  # 13.27B: "13B" is rounded
    # KV: CSA keeps (512 + 128) / 4 values per token, HCA 512 / 128; V3 keeps 576 per layer
    per = flash["v4"]["kv_bytes_per_token_by_layer_type"]
    assert per["compressed_sparse_attention"] == 320 and per["heavily_compressed_attention"] == 8
    assert flash["kv_cache_bytes_per_token"] == 21 * 320 + 20 * 8
    assert flash["v4"]["v3_cache_bytes_at_1m"] / flash["v4"]["v4_cache_bytes_at_1m"] > 9


def test_bad_v4_configs_raise():
    cfg = get_preset("tiny-v4")
    with pytest.raises(ValueError, match="layer_types"):
        cfg.replace(**{"v4.layer_types": ["sliding_attention"]})
    with pytest.raises(ValueError, match="o_groups"):
        cfg.replace(**{"v4.o_groups": 3})
    with pytest.raises(ValueError, match="sqrtsoftplus"):
        get_preset("tiny").replace(**{"moe.scoring_func": "sqrtsoftplus"})


@torch.no_grad()
def test_compressed_entries_grow_in_place_and_branches_stay_independent():
    from moeforge.model.v4_attention import _RowStore

    base = torch.randn(2, 3, 4)
    e1, store = _RowStore.append(base, None, torch.ones(2, 1, 4))
    e2, store2 = _RowStore.append(e1, store, 2 * torch.ones(2, 2, 4))
    assert store2 is store and e2.data_ptr() == e1.data_ptr()  # appended in place, no copy
    torch.testing.assert_close(e2[:, :3], base)
    # continuing from the older state again must not overwrite what e2 sees
    e2b, store3 = _RowStore.append(e1, store, 5 * torch.ones(2, 1, 4))
    assert store3 is not store
    assert torch.equal(e2[:, 3:], torch.cat([torch.ones(2, 1, 4), 2 * torch.ones(2, 2, 4)], 1))
    assert torch.equal(e2b[:, :4], e1) and torch.equal(e2b[:, 4:], 5 * torch.ones(2, 1, 4))
    # with autograd on, plain concatenation (training keeps a simple graph)
    with torch.enable_grad():
        x = torch.randn(1, 2, 4, requires_grad=True)
        out, st = _RowStore.append(torch.zeros(1, 0, 4), None, x)
        assert st is None and out.requires_grad
