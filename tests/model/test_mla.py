import pytest
import torch

from moeforge.config import AttentionConfig, RopeConfig
from moeforge.model.layers import RotaryEmbedding
from moeforge.model.mla import MLA, LatentKV


def _mla(q_lora_rank=24, yarn=False):
    rope = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                      mscale_all_dim=1.0) if yarn else RopeConfig()
    cfg = AttentionConfig(num_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=20, qk_nope_head_dim=12,
                          qk_rope_head_dim=6, v_head_dim=10, rope=rope)
    m = MLA(32, cfg).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m, RotaryEmbedding(6, rope)


@pytest.mark.parametrize("q_lora_rank,yarn", [(24, True), (None, False)])
def test_absorbed_equals_naive_full_sequence(q_lora_rank, yarn):
    m, rot = _mla(q_lora_rank, yarn)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cos, sin = rot(torch.arange(11))
    naive, kv = m(x, cos, sin)
    absorbed, _kv2 = m(x, cos, sin, absorbed=True)
    torch.testing.assert_close(absorbed, naive, atol=1e-10, rtol=1e-10)
    assert kv.latent.shape == (2, 11, 20) and kv.k_rope.shape == (2, 11, 6)


@pytest.mark.parametrize("absorbed", [True, False])
def test_cached_decode_equals_full_recompute(absorbed):
    m, rot = _mla()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    cos, sin = rot(torch.arange(13))
    full, _ = m(x, cos, sin)
    # prefill 5, then a chunk of 3, then one token at a time
    out, cache = m(x[:, :5], cos[:5], sin[:5])
    outs = [out]
    o, cache = m(x[:, 5:8], cos[5:8], sin[5:8], past=cache, absorbed=absorbed)
    outs.append(o)
    for t in range(8, 13):
        o, cache = m(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], past=cache, absorbed=absorbed)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10)
    assert isinstance(cache, LatentKV) and cache.latent.shape[1] == 13


def test_causality():
    m, rot = _mla()
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    cos, sin = rot(torch.arange(9))
    a, _ = m(x, cos, sin)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    b, _ = m(x2, cos, sin)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
