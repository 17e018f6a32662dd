import pytest
import torch

import moeforge
from moeforge.config import get_preset
from moeforge.model.checkpoint import WEIGHTS, save_model
from moeforge.model.transformer import Transformer


@pytest.fixture
def small_cfg():
    # the tiny preset with narrower dims: same features, faster tests
    return get_preset("tiny").replace(vocab_size=300, hidden_size=64, intermediate_size=96, **{
        "moe.moe_intermediate_size": 32, "attention.q_lora_rank": 32, "attention.kv_lora_rank": 24,
        "mtp.num_layers": 2})


def test_forward_shapes_mtp_and_stats(small_cfg):
    m = Transformer(small_cfg).eval()
    ids = torch.randint(0, 300, (2, 12))
    out = m(ids)
    assert out.logits.shape == (2, 12, 300)
    assert [t.shape for t in out.mtp_logits] == [(2, 11, 300), (2, 10, 300)]
    # 3 MoE layers + 2 MTP layers, each with every pair counted once
    assert out.expert_counts.shape == (3 + 2, 16)
    assert out.expert_counts[:3].sum(1).tolist() == [24 * 4] * 3
    assert out.expert_counts[3].sum() == 22 * 4 and out.expert_counts[4].sum() == 20 * 4


def test_mtp_depth_one_is_the_documented_formula(small_cfg):
    m = Transformer(small_cfg).eval()
    ids = torch.randint(0, 300, (1, 9))
    out = m(ids)
    mod = m.mtp[0]
    cos, sin = m.rotary(torch.arange(8))
    h = mod.eh_proj(torch.cat([mod.enorm(m.embed_tokens(ids[:, 1:])), mod.hnorm(out.hidden[:, :8])], -1))
    h, _, _ = mod.block(h, cos, sin)
    torch.testing.assert_close(out.mtp_logits[0], m.lm_head(mod.norm(h)))


def test_model_cached_absorbed_decode_equals_full_forward(small_cfg):
    m = Transformer(small_cfg).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        full = m(ids).logits
        out = m(ids[:, :6], return_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(6, 16):
            step = m(ids[:, t : t + 1], start_pos=t, cache=cache, absorbed=True, return_cache=True)
            logits.append(step.logits)
            cache = step.cache
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=2e-5, rtol=1e-4)
    assert cache[0].latent.shape == (2, 16, small_cfg.attention.kv_lora_rank)


def test_save_load_round_trip_and_load_model_api(small_cfg, tmp_path):
    m = Transformer(small_cfg).eval()
    with torch.no_grad():
        m.layers[1].mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    save_model(m, tmp_path / "ckpt")
    loaded = moeforge.load_model(tmp_path / "ckpt", device="cpu")
    assert not loaded.training
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        a, b = m(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.mtp_logits[1], b.mtp_logits[1])
    # overwriting an existing checkpoint replaces it whole
    save_model(loaded, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_tied_embeddings_saved_once(small_cfg, tmp_path):
    cfg = small_cfg.replace(tie_word_embeddings=True)
    m = Transformer(cfg)
    assert m.lm_head.weight is m.embed_tokens.weight
    save_model(m, tmp_path / "c")
    loaded = moeforge.load_model(tmp_path / "c", device="cpu")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)


def test_bad_checkpoints_name_the_problem(small_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    m = Transformer(small_cfg)
    save_model(m, tmp_path / "c")
    path = tmp_path / "c" / WEIGHTS
    sd = load_file(path)
    sd.pop("layers.2.mlp.experts.down_proj")
    save_file(sd, path)
    with pytest.raises(ValueError, match="missing tensor.*layers.2.mlp.experts.down_proj"):
        moeforge.load_model(tmp_path / "c", device="cpu")
    sd["layers.2.mlp.experts.down_proj"] = torch.zeros(3, 3)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"layers.2.mlp.experts.down_proj.*shape \(3, 3\)"):
        moeforge.load_model(tmp_path / "c", device="cpu")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        moeforge.load_model(tmp_path / "c", device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        moeforge.load_model(tmp_path / "nothing")


def test_ids_must_be_integer_matrix(small_cfg):
    m = Transformer(small_cfg)
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        m(torch.zeros(3, 4))


def test_model_never_imports_torch_distributed():
    import pathlib

    root = pathlib.Path(moeforge.__file__).parent / "model"
    for f in root.glob("*.py"):
        assert "torch.distributed" not in f.read_text(), f
