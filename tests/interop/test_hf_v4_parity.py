"""DeepSeek-V4 parity with transformers' DeepseekV4ForCausalLM, through `moeforge convert` both ways.

A small random HF model covers all three attention types, hash and top-k MoE layers,
hc_mult > 1 and a sequence longer than the window and than both compression blocks.
"""

from __future__ import annotations

import pytest
import torch

import moeforge
from moeforge.cli import main
from moeforge.config import ModelConfig

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM

LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
          "compressed_sparse_attention"]


def _hf_model(**over) -> DeepseekV4ForCausalLM:
    kw = dict(  # noqa: C408 - keyword form reads like the HF config
        vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, n_routed_experts=8, num_experts_per_tok=2,
        layer_types=LAYERS, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], sliding_window=6, o_groups=2, o_lora_rank=8,
        index_n_heads=4, index_head_dim=8, index_topk=3, hc_mult=3, num_nextn_predict_layers=0)
    kw.update(over)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger than the init scale so every branch moves the logits
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], kw["n_routed_experts"], generator=g).argsort(-1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


CASES = {
    "default-rope": {},
    "yarn-compress-rope": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                                               "original_max_position_embeddings": 16}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_round_trip(case, tmp_path):
    hf = _hf_model(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours = moeforge.load_model(tmp_path / "ours", device="cpu", dtype=torch.float32)
    assert ours.cfg.v4 is not None and ours.cfg.mtp.num_layers == 0
    ids = torch.randint(0, 96, (2, 41), generator=torch.Generator().manual_seed(2))  # > window 6, > blocks 4 and 8
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids, mtp=False).logits
    err = (want - got).abs().max().item()
    assert err <= 1e-4, err
    assert want.abs().max() > 1.0  # a meaningful comparison

    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max().item() <= 1e-5
    assert ModelConfig.from_hf_dict(back.config.to_dict()).v4 == ours.cfg.v4


def test_mtp_survives_a_round_trip(tmp_path):
    from moeforge.config import get_preset
    from moeforge.interop.convert import convert_from_hf, convert_to_hf
    from moeforge.model import build_model

    cfg = get_preset("tiny-v4").replace(vocab_size=128, hidden_size=32, **{"moe.moe_intermediate_size": 16,
                                                                            "moe.n_routed_experts": 8})
    model = build_model(cfg).eval()
    moeforge.save_model(model, tmp_path / "ours")
    back = moeforge.load_model(convert_from_hf(convert_to_hf(tmp_path / "ours", tmp_path / "hf"), tmp_path / "b"),
                               device="cpu")
    assert back.cfg.mtp.num_layers == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
