import json

import pytest

from moeforge.config import PRESETS, ModelConfig, get_preset, load_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name, tmp_path):
    cfg = get_preset(name)
    cfg.save(tmp_path / "config.json")
    assert load_config(tmp_path) == cfg
    # and through the HF config.json mapping
    (tmp_path / "hf.json").write_text(json.dumps(cfg.to_hf_dict()))
    back = load_config(tmp_path / "hf.json")
    assert back.replace(name=cfg.name) == cfg


@pytest.mark.parametrize(
    "change,message",
    [
        ({"moe.num_experts_per_tok": 17}, "num_experts_per_tok"),
        ({"moe.n_group": 3}, "divisible by n_group"),
        ({"moe.topk_group": 5}, "topk_group"),
        ({"moe.topk_group": 1, "moe.num_experts_per_tok": 5}, "cannot hold top-k"),
        ({"attention.qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"attention.q_lora_rank": 0}, "q_lora_rank"),
        ({"moe.scoring_func": "relu"}, "scoring_func"),
        ({"moe.first_k_dense_replace": 9}, "first_k_dense_replace"),
        ({"eos_token_id": 99999}, "eos_token_id"),
        ({"attention.rope.type": "ntk"}, "rope type"),
    ],
)
def test_validation_names_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny").replace(**change)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="unknown field.*moe"):
        ModelConfig.from_dict({"moe": {"experts": 3}})


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_config(tmp_path / "other.json")


def test_hf_v3_and_kimi_configs_map_field_by_field():
    hf = {
        "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
        "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.827, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 0, "eos_token_id": [163585], "bos_token_id": 163584,
        "max_position_embeddings": 131072,
    }
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.moe.scoring_func == "sigmoid" and cfg.moe.topk_method == "noaux_tc"
    assert cfg.attention.rope.type == "yarn" and cfg.attention.rope.theta == 50000.0
    assert cfg.eos_token_id == 163585 and cfg.moe.n_routed_experts == 384
    assert cfg.replace(name="kimi-k2") == get_preset("kimi-k2")


def test_v4_hf_config_keeps_the_sliding_layers_rope_base():
    hf = get_preset("tiny-v4").to_hf_dict()
    hf["rope_theta"] = 50000.0
    if isinstance(hf.get("rope_parameters"), dict) and isinstance(hf["rope_parameters"].get("main"), dict):
        hf["rope_parameters"]["main"]["rope_theta"] = 50000.0
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.attention.rope.theta == 50000.0
    assert cfg.v4.compress_rope.theta == get_preset("tiny-v4").v4.compress_rope.theta
