"""The `info` and `doctor` subcommands: JSON, tables, one-line errors."""

from __future__ import annotations

import json

from moeforge.cli import main
from moeforge.config import PRESETS, get_preset


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_deepseek_v3(capsys):
    s = _json(capsys, ["info", "--preset", "deepseek-v3", "--json"])
    assert s["config"] == "deepseek-v3"
    assert round(s["total_params"] / 1e9, 2) == 671.03 and round(s["active_params"] / 1e9, 2) == 37.55
    assert s["total_params_with_mtp"] > s["total_params"] and s["active_params_with_mtp"] > s["active_params"]
    assert s["kv_cache_bytes_per_token"] == 70_272
    assert s["kv_cache_bytes_per_token_full_kv"] == 4_997_120
    assert s["context"] == 4096 and s["flops_per_token_decode"] > 2 * 36e9
    assert 6 * 36e9 < s["flops_per_token_train"] < 6 * 45e9
    assert set(s["components"]) >= {"embedding", "head", "attention", "routed_experts", "shared_experts", "router"}
    assert all(set(c) == {"total", "active"} for c in s["components"].values())
    assert "convention" in s


def test_info_context_flag(capsys):
    a = _json(capsys, ["info", "--preset", "tiny", "--json", "--context", "128"])
    b = _json(capsys, ["info", "--preset", "tiny", "--json", "--context", "256"])
    assert a["context"] == 128 and b["flops_per_token_decode"] > a["flops_per_token_decode"]


def test_info_table(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    for word in ("embedding", "attention", "routed_experts", "shared_experts", "router", "mtp", "671.0B", "70,272"):
        assert word in out


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and "Traceback" not in err
    assert err.startswith("moeforge: error:")
    return err


def test_unknown_preset(capsys):
    err = _one_line_error(capsys, ["info", "--preset", "gpt-5"])
    assert "gpt-5" in err and all(name in err for name in PRESETS)


def test_bad_config_files(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _one_line_error(capsys, ["info", "--config", str(bad)])
    assert "does not exist" in _one_line_error(capsys, ["info", "--config", str(tmp_path / "missing.json")])
    assert "either" in _one_line_error(capsys, ["info", "--preset", "tiny", "--config", str(bad)])


def test_hf_config_gives_the_preset_numbers(capsys, tmp_path):
    folder = tmp_path / "DeepSeek-V3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_preset("deepseek-v3").to_hf_dict()))
    from_hf = _json(capsys, ["info", "--config", str(folder / "config.json"), "--json"])
    preset = _json(capsys, ["info", "--preset", "deepseek-v3", "--json"])
    assert from_hf.pop("config") == "DeepSeek-V3" and preset.pop("config") == "deepseek-v3"
    assert from_hf == preset


def test_doctor_json(capsys):
    r = _json(capsys, ["doctor", "--json"])
    assert {"accelerator", "dtypes", "grouped_mm", "distributed_backends", "complex_ops"} <= set(r)
