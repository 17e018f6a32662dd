"""HF <-> moeforge checkpoint conversion: logit parity with transformers, layouts, bad input.

Small random HF models (fp32) are saved with `save_pretrained`, converted, loaded with
`moeforge.load_model` and compared with transformers on the same ids; then converted
back with `convert_to_hf` and loaded by transformers again.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)
from transformers.modeling_layers import MtpModel

import moeforge
from moeforge.cli import main
from moeforge.config import get_preset
from moeforge.interop.convert import convert_from_hf, convert_to_hf
from moeforge.interop.hf import dequantize_fp8, iter_hf_tensors

TOL = 1e-4
MAX_ERR: dict[str, float] = {}  # case -> max abs logit error, printed at the end (pytest -s)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
COMMON = dict(  # noqa: C408 - keyword form reads like the HF config
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MAX_ERR:
        print("\nmax abs logit error: " + ", ".join(f"{k}={v:.2e}" for k, v in MAX_ERR.items()))


def _ids(vocab=256):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomize(model):
    """Norm weights, biases and the router's selection bias away from their trivial init."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn_like(b))
    return model


def _v3(**kw):
    cfg = DeepseekV3Config(**{**COMMON, "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
                              "n_group": 4, "topk_group": 2, "num_nextn_predict_layers": 0, **kw})
    return _randomize(DeepseekV3ForCausalLM(cfg).float().eval())


def _v2(**kw):
    cfg = DeepseekV2Config(**{**COMMON, "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 2,
                              "q_lora_rank": None, "norm_topk_prob": False, **kw})
    return _randomize(DeepseekV2ForCausalLM(cfg).float().eval())


def _err(a, b):
    return (a - b).abs().max().item()


def _check_parity(case, hf_model, tmp_path):
    """HF -> moeforge logits, then moeforge -> HF logits; both within TOL."""
    hf_model.save_pretrained(tmp_path / "hf")
    ours_dir = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    ours = moeforge.load_model(ours_dir, device="cpu")
    ids = _ids()
    with torch.no_grad():
        ref, got = hf_model(ids).logits, ours(ids).logits
        assert ref.abs().max() > 1.0  # logits large enough for the tolerance to mean something
        e1 = _err(ref, got)
        assert e1 <= TOL, f"{case}: HF -> moeforge max abs logit error {e1}"
        back = AutoModelForCausalLM.from_pretrained(convert_to_hf(ours_dir, tmp_path / "back"), dtype=torch.float32)
        e2 = _err(back.eval()(ids).logits, got)
        assert e2 <= TOL, f"{case}: moeforge -> HF max abs logit error {e2}"
    MAX_ERR[case] = max(e1, e2)
    return ours_dir, ours


# ------------------------------------------------------------------ parity cases
def test_v3_q_lora_yarn_groups_interleaved(tmp_path):
    _check_parity("v3_qlora_yarn", _v3(q_lora_rank=32, rope_parameters=YARN, rope_interleave=True), tmp_path)


def test_v3_plain_q_half_split_rope(tmp_path):
    _check_parity("v3_noqlora", _v3(q_lora_rank=None, rope_interleave=False), tmp_path)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_lite_softmax(method, tmp_path):
    kw = {"topk_method": method, "rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}
    if method == "group_limited_greedy":
        kw.update(n_group=4, topk_group=2, q_lora_rank=32, routed_scaling_factor=2.0)
    _, ours = _check_parity(f"v2_{method}", _v2(**kw), tmp_path)
    assert ours.cfg.moe.scoring_func == "softmax" and ours.cfg.moe.topk_method == method


@pytest.mark.parametrize("case", ["softmax_half_split_rope", "sigmoid_greedy_no_shared"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_moeforge_only_configs_to_hf(case, tmp_path):
    """Our configs that HF spells differently: rotary rows permuted for V2, greedy sigmoid as one-group noaux_tc."""
    over = {"vocab_size": 256, "hidden_size": 64, "num_layers": 3, "attention.q_lora_rank": None}
    if case == "softmax_half_split_rope":
        over.update({"attention.rope.interleave": False, "moe.scoring_func": "softmax", "moe.topk_method": "greedy",
                     "moe.norm_topk_prob": False, "mtp.num_layers": 0})
    else:
        over.update({"moe.topk_method": "greedy", "moe.n_shared_experts": 0, "mtp.num_layers": 0})
    model = _randomize(moeforge.Transformer(get_preset("tiny").replace(**over))).eval()
    moeforge.save_model(model, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(convert_to_hf(tmp_path / "ours", tmp_path / "hf"), dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        e = _err(hf.eval()(ids).logits, model(ids).logits)
    MAX_ERR[case] = e
    assert e <= TOL
    back = moeforge.load_model(convert_from_hf(tmp_path / "hf", tmp_path / "back"), device="cpu")
    with torch.no_grad():
        assert _err(back(ids).logits, model(ids).logits) <= TOL


# ------------------------------------------------------------------ MTP
def test_mtp_layer_round_trip(tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=256, hidden_size=64, num_layers=2, **{"mtp.num_layers": 1})
    model = _randomize(moeforge.Transformer(cfg)).eval()
    moeforge.save_model(model, tmp_path / "ours")
    hf_dir = convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    keys = set(load_file(hf_dir / "model.safetensors"))
    L = cfg.num_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "mlp.experts.0.gate_proj.weight", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{L}.{k}" in keys
    back = moeforge.load_model(convert_from_hf(hf_dir, tmp_path / "back"), device="cpu")
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = _ids()
    with torch.no_grad():
        out, out2 = model(ids), back(ids)
        assert torch.equal(out.mtp_logits[0], out2.mtp_logits[0])
        # transformers' own MTP module reads the same layer: same draft logits
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}.*"]  # HF hard-codes layer 61 (V3)
        mtp = MtpModel.from_pretrained(hf, device_map={"": "cpu"}).eval()
        T = ids.shape[1]
        pos = torch.arange(T - 1).expand(2, -1)
        h = mtp.forward_layer(0, out.hidden[:, : T - 1], pos, None, input_ids=ids[:, 1:])
        e = _err(mtp._project_to_logits(h), out.mtp_logits[0])
    MAX_ERR["mtp_vs_hf"] = e
    assert e <= TOL


def test_declared_mtp_without_weights_converts_without_mtp(tmp_path):
    _v3(num_nextn_predict_layers=1).save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="declares 1 MTP layer"):
        out = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert moeforge.load_config(out).mtp.num_layers == 0


# ------------------------------------------------------------------ layouts
def test_sharded_input_and_output(tmp_path):
    hf = _v3(q_lora_rank=32)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = moeforge.load_model(convert_from_hf(tmp_path / "hf", tmp_path / "ours"), device="cpu")
    ids = _ids()
    with torch.no_grad():
        assert _err(ours(ids).logits, hf(ids).logits) <= TOL
    out = convert_to_hf(tmp_path / "ours", tmp_path / "back", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert all((out / s).stat().st_size <= 100_000 + 4096 for s in shards[:-1])  # + the header
    direct = moeforge.load_model(out, device="cpu")  # sharded HF folders load without converting
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert _err(direct(ids).logits, ours(ids).logits) == 0
        assert _err(back(ids).logits, ours(ids).logits) <= TOL


def test_fused_expert_keys_equal_per_expert(tmp_path):
    hf = _v3()
    hf.save_pretrained(tmp_path / "per_expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(tmp_path / "per_expert" / "config.json", fused)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers 5 in memory: fused experts
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file(sd, fused / "model.safetensors")
    a = moeforge.load_model(convert_from_hf(tmp_path / "per_expert", tmp_path / "a"), device="cpu").state_dict()
    b = moeforge.load_model(convert_from_hf(fused, tmp_path / "b"), device="cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_files_copied(tmp_path):
    _v3().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    out = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (convert_to_hf(out, tmp_path / "back") / "tokenizer.json").exists()


# ------------------------------------------------------------------ FP8
def test_dequantize_fp8_blocks():
    w = (torch.randn(200, 300) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3) + 0.5
    got = dequantize_fp8(w, scale)
    ref = torch.empty(200, 300)
    for i in range(2):
        for j in range(3):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            ref[rows, cols] = w[rows, cols].float() * scale[i, j]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref.bfloat16())
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        dequantize_fp8(w, torch.ones(1, 3))


def test_fp8_weight_in_checkpoint_is_dequantised(tmp_path):
    _v3().save_pretrained(tmp_path / "hf")
    cfg_path, weights = tmp_path / "hf" / "config.json", tmp_path / "hf" / "model.safetensors"
    hf_cfg = json.loads(cfg_path.read_text())
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32]}
    cfg_path.write_text(json.dumps(hf_cfg))
    sd = load_file(weights)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"  # (32, 64): 1 x 2 blocks
    sd[key] = (sd[key] * 50).to(torch.float8_e4m3fn)
    sd[key + "_scale_inv"] = torch.tensor([[0.02, 0.03]])
    save_file(sd, weights)
    cfg = moeforge.interop.hf.hf_config(tmp_path / "hf")
    got = dict(iter_hf_tensors(tmp_path / "hf", cfg))["layers.1.mlp.experts.gate_up_proj"][3, 32:]
    want = torch.cat([sd[key][:, :32].float() * 0.02, sd[key][:, 32:].float() * 0.03], 1)
    torch.testing.assert_close(got, want.bfloat16().to(got.dtype))  # dequantised to bf16


# ------------------------------------------------------------------ bad input
def _saved(tmp_path):
    _v3().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", load_file(tmp_path / "hf" / "model.safetensors")


def test_missing_tensor_names_it(tmp_path):
    folder, sd = _saved(tmp_path)
    del sd["model.layers.2.mlp.experts.5.down_proj.weight"]
    del sd["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight"):
        convert_from_hf(folder, tmp_path / "out")
    sd["model.layers.2.mlp.experts.5.down_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        convert_from_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.kv_b_proj.weight",
                                 "model.layers.1.mlp.experts.2.gate_proj.weight"])
def test_wrong_shape_names_tensor_and_file(key, tmp_path):
    folder, sd = _saved(tmp_path)
    sd[key] = torch.zeros(3, 5)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}' in model\.safetensors has shape \(3, 5\)"):
        convert_from_hf(folder, tmp_path / "out")


def test_unexpected_tensor(tmp_path):
    folder, sd = _saved(tmp_path)
    sd["model.layers.1.mlp.experts.16.up_proj.weight"] = torch.zeros(32, 64)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts\.16\.up_proj\.weight' in model\.safetensors is unexpected"):
        convert_from_hf(folder, tmp_path / "out")


@pytest.mark.parametrize("problem", ["no_folder", "no_config", "bad_json", "model_type", "no_weights"])
def test_bad_folders(problem, tmp_path):
    folder = tmp_path / "hf"
    if problem != "no_folder":
        folder.mkdir()
        text = {"no_config": None, "bad_json": "{oops", "model_type": '{"model_type": "llama"}',
                "no_weights": json.dumps(get_preset("tiny").to_hf_dict())}[problem]
        if text is not None:
            (folder / "config.json").write_text(text)
    msg = {"no_folder": "does not exist", "no_config": "has no config.json", "bad_json": "not valid JSON",
           "model_type": "model_type 'llama' is not supported", "no_weights": "has neither model.safetensors"}[problem]
    with pytest.raises(ValueError, match=msg):
        convert_from_hf(folder, tmp_path / "out")


def test_cli_bad_folder_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    rc = main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("moeforge: error:") and "not valid JSON" in err and err.count("\n") == 1
    rc = main(["convert", "--to-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_to_hf_rejects_unrepresentable_router(tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=256, hidden_size=64, num_layers=2,
                                     **{"moe.topk_method": "group_limited_greedy"})
    moeforge.save_model(moeforge.Transformer(cfg), tmp_path / "ours")
    with pytest.raises(ValueError, match="no HF DeepseekV3 equivalent"):
        convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_v2_config_is_always_interleaved():
    """transformers' DeepseekV2 (like DeepSeek's code) ignores rope_interleave: its pairs are always interleaved."""
    d = get_preset("deepseek-v2-lite").to_hf_dict()
    d["rope_interleave"] = False
    assert moeforge.ModelConfig.from_hf_dict(d).attention.rope.interleave
    d = get_preset("deepseek-v3").to_hf_dict()
    d["rope_interleave"] = False
    assert not moeforge.ModelConfig.from_hf_dict(d).attention.rope.interleave
