import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

from moeforge.config import RopeConfig
from moeforge.model.layers import RMSNorm, RotaryEmbedding, apply_rope, rope_inv_freq


def test_rmsnorm_matches_formula_and_keeps_dtype():
    n = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * n.weight
    torch.testing.assert_close(n(x), ref)
    assert n.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (0.707, 0.707), (1.0, 0.0)])
def test_yarn_frequencies_match_hf(mscale, mscale_all_dim):
    rope = RopeConfig(theta=10000.0, type="yarn", factor=40.0, original_max_position_embeddings=4096,
                      beta_fast=32, beta_slow=1, mscale=mscale, mscale_all_dim=mscale_all_dim)
    hf = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim})
    ref_inv, ref_amp = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, amp = rope_inv_freq(64, rope)
    torch.testing.assert_close(inv, ref_inv)
    assert math.isclose(amp, ref_amp, rel_tol=1e-12)
    # YaRN must actually change the low frequencies and keep the high ones
    plain, _ = rope_inv_freq(64, RopeConfig())
    assert torch.equal(inv[0], plain[0]) and inv[-1] < plain[-1] / 10


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_hf_in_attention_scores(interleave):
    # Our rotated output is always in half-split order; HF's interleaved variant is too.
    # What must agree is the rotation itself, checked here element-wise against HF.
    B, T, H, D = 2, 7, 3, 8
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, 1, D)
    cos, sin = RotaryEmbedding(D, RopeConfig(theta=500.0))(torch.arange(T))
    qo, ko = apply_rope(q, cos, sin, interleave), apply_rope(k, cos, sin, interleave)
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    fn = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    hq, hk = fn(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(qo, hq.transpose(1, 2))
    torch.testing.assert_close(ko, hk.transpose(1, 2))


def test_rope_relative_position_property():
    # <R(m) q, R(n) k> depends only on m - n
    D = 16
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    rot = RotaryEmbedding(D, RopeConfig(theta=10000.0))

    def score(m, n):
        cm, sm = rot(torch.tensor([m]))
        cn, sn = rot(torch.tensor([n]))
        return (apply_rope(q, cm, sm, True) * apply_rope(k, cn, sn, True)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(2, 5))
