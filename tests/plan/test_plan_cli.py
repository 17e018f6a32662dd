"""`moeforge plan train | serve | compare`: JSON keys, tables, PNG, one-line errors."""

from __future__ import annotations

import json

import pytest

from moeforge.cli import main

TRAIN_KEYS = {"total_params", "active_params", "train_flops", "chips", "chip_hours", "days", "mfu",
              "memory_per_chip_gb", "fits", "layout"}
SERVE_KEYS = {"weights_gb", "kv_bytes_per_token", "max_concurrency", "decode_tokens_per_s_bound"}


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_json_keys_and_chip_hours(capsys):
    p = _json(capsys, ["plan", "train", "--model", "deepseek-v3", "--tokens", "14.8e12", "--hardware", "h800",
                       "--chips", "2048", "--chip-hours", "2.788e6", "--pp", "16", "--ep", "64", "--zero", "1", "--json"])
    assert TRAIN_KEYS <= set(p)
    assert p["chips"] == 2048 and p["chip_hours"] == 2.788e6 and p["fits"] is True
    assert p["layout"]["pp"] == 16 and p["layout"]["ep"] == 64 and p["layout"]["zero"] == 1
    assert 0.3 < p["mfu"] < 0.45 and "implied" in p["mfu_source"]
    assert p["energy_mwh"] == pytest.approx(2.788e6 * 700 / 1e6) and p["cost_usd"] == pytest.approx(2.788e6 * 2)


def test_train_days_gives_chips(capsys):
    p = _json(capsys, ["plan", "train", "--model", "deepseek-v2-lite", "--tokens", "5.7e12", "--hardware", "h100",
                       "--days", "10", "--mfu", "0.4", "--json"])
    assert p["fits"] and p["days"] <= 10 and p["chips"] % 8 == 0
    assert p["chip_hours"] == pytest.approx(p["train_flops"] / (989e12 * 0.4) / 3600)


def test_train_table_prints_assumptions(capsys):
    assert main(["plan", "train", "--model", "deepseek-v3", "--tokens", "1e12", "--hardware", "b200",
                 "--chips", "1024", "--precision", "fp8"]) == 0
    out = capsys.readouterr().out
    for word in ("chip-hours", "layout", "gradients", "optimizer", "activations", "assumptions", "MFU", "4500"):
        assert word in out


def test_serve_json(capsys):
    p = _json(capsys, ["plan", "serve", "--model", "deepseek-v3", "--hardware", "h200", "--context", "32768",
                       "--concurrency", "64", "--json"])
    assert SERVE_KEYS <= set(p)
    assert p["kv_bytes_per_token"] == 70_272 and p["weights_gb"] == pytest.approx(671.03e9 * 2 / 1e9, rel=1e-3)
    assert p["max_concurrency"] >= 64 and p["chips"] >= p["chips_for_weights"]
    assert p["decode_tokens_per_s_bound"] > 0 and p["prefill_tokens_per_s_bound"] > 0
    fp8 = _json(capsys, ["plan", "serve", "--model", "deepseek-v3", "--hardware", "h200", "--context", "32768",
                         "--concurrency", "64", "--weight-precision", "fp8", "--json"])
    assert fp8["weights_gb"] == pytest.approx(p["weights_gb"] / 2) and fp8["chips"] < p["chips"]


def test_compare_train_and_serve(capsys, tmp_path):
    png = tmp_path / "cmp.png"
    r = _json(capsys, ["plan", "compare", "--model", "deepseek-v2-lite", "--tokens", "5.7e12", "--days", "30",
                       "--context", "8192", "--concurrency", "16", "--plot", str(png), "--json"])
    train, serve = r["train"], r["serve"]
    names = {row["hardware"] for row in train["rows"]}
    assert {"h100", "h800", "h200", "b200", "ascend-910b", "ascend-910c", "ascend-950pr", "ascend-950dt"} <= names
    assert all(row["sparsity_dividend"] > 1 for row in train["rows"])
    assert any(v["a"] == "h800" and v["b"] == "ascend-910b" for v in train["vendor_ratios"])
    assert (tmp_path / "cmp_train.png").stat().st_size > 10_000 and (tmp_path / "cmp_serve.png").exists()
    assert {row["hardware"] for row in serve["rows"]} == names


def test_compare_refuses_precision_per_chip(capsys, tmp_path):
    r = _json(capsys, ["plan", "compare", "--model", "tiny", "--tokens", "1e9", "--days", "1", "--precision",
                       "fp8", "--plot", str(tmp_path / "c.png"), "--json"])
    rows = {row["hardware"]: row for row in r["rows"]}
    assert "no FP8" in rows["ascend-910b"]["error"] and "chips" in rows["h100"]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and err.startswith("moeforge: error:")
    return err


BASE = ["plan", "train", "--model", "deepseek-v3", "--hardware", "h800"]


@pytest.mark.parametrize("argv, words", [
    (["plan", "train", "--model", "deepseek-v3", "--hardware", "ascend-910b", "--tokens", "1e12", "--chips", "8",
      "--precision", "fp8"], ["ascend-910b", "FP8", "--precision bf16"]),
    (["plan", "train", "--model", "deepseek-v3", "--hardware", "tpu", "--tokens", "1e12", "--chips", "8"],
     ["unknown hardware", "h800"]),
    (["plan", "train", "--model", "gpt-9", "--hardware", "h800", "--tokens", "1e12", "--chips", "8"],
     ["gpt-9", "deepseek-v3"]),
    (BASE + ["--tokens", "-5", "--chips", "8"], ["--tokens"]),
    (BASE + ["--tokens", "1e20", "--chips", "8"], ["--tokens"]),
    (BASE + ["--tokens", "1e12", "--chips", "8", "--mfu", "1.5"], ["--mfu"]),
    (BASE + ["--tokens", "1e12", "--chips", "-8"], ["--chips"]),
    (BASE + ["--tokens", "1e12", "--days", "0"], ["--days"]),
    (BASE + ["--tokens", "1e12"], ["--chips", "--days"]),
    (BASE + ["--tokens", "1e12", "--chips", "8", "--days", "3"], ["not both"]),
    (BASE + ["--tokens", "1e12", "--days", "3", "--chip-hours", "100"], ["--chip-hours"]),
    (["plan", "serve", "--model", "deepseek-v3", "--hardware", "ascend-910c", "--weight-precision", "fp8"],
     ["FP8", "--weight-precision"]),
    (["plan", "serve", "--model", "deepseek-v3", "--hardware", "h800", "--context", "-1"], ["--context"]),
    (["plan", "serve", "--model", "deepseek-v3", "--hardware", "h800", "--concurrency", "0"], ["--concurrency"]),
    (["plan", "compare", "--model", "deepseek-v3"], ["--tokens", "--context"]),
])
def test_one_line_errors(capsys, argv, words):
    err = _one_line_error(capsys, argv)
    for w in words:
        assert w in err, err
