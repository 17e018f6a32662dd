"""The hardware catalog: every chip the issue names, a source per value, user files, the measured cpu entry."""

from __future__ import annotations

import json

import pytest

from moeforge.plan.catalog import FIELDS, get_chip, load_catalog

NAMED = ("h100", "h800", "h200", "b200", "ascend-910b", "ascend-910c", "ascend-950pr", "ascend-950dt")


def test_catalog_has_every_named_chip_with_sources():
    cat = load_catalog()
    assert set(NAMED) <= set(cat)
    for name in NAMED:
        chip = cat[name]
        assert chip.vendor in ("NVIDIA", "Huawei")
        for key in FIELDS:
            assert chip.sources[key].strip(), f"{name}.{key} has no source"
        assert chip.get("hbm_gb") and chip.get("hbm_tbps") and chip.get("scale_up_gbps")


def test_published_figures():
    cat = load_catalog()
    assert cat["h800"].tflops("bf16") == 989 and cat["h800"].tflops("fp8") == 1979
    assert cat["h800"].get("scale_up_gbps") < cat["h100"].get("scale_up_gbps")
    assert cat["b200"].tflops("fp4") == 9000 and cat["h200"].get("hbm_gb") == 141
    assert cat["ascend-950dt"].get("hbm_gb") == 144 and cat["ascend-950pr"].get("hbm_tbps") == 1.6


def test_910b_keeps_the_range_and_says_which_value():
    chip = get_chip("ascend-910b")
    assert chip.ranges["bf16_tflops"] == [280, 376]
    assert chip.tflops("bf16") == 280 and "280" in chip.sources["bf16_tflops"]


@pytest.mark.parametrize("name", ["ascend-910b", "ascend-910c"])
def test_no_fp8_on_910b_910c(name):
    chip = get_chip(name)
    assert chip.tflops("fp8") is None
    with pytest.raises(ValueError, match="no FP8"):
        chip.require_precision("fp8", "train")


def test_hardware_file_adds_and_overrides(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"chips": {
        "my-chip": {"vendor": "Acme", "bf16_tflops": 500, "hbm_gb": 96, "hbm_tbps": {"value": 3, "source": "sheet"}},
        "h100": {"vendor": "NVIDIA", "bf16_tflops": 900, "hbm_gb": 80, "hbm_tbps": 3.35},
    }}))
    cat = load_catalog(f)
    assert cat["my-chip"].tflops("bf16") == 500 and cat["my-chip"].sources["hbm_tbps"] == "sheet"
    assert cat["h100"].tflops("bf16") == 900 and "ascend-910b" in cat
    assert get_chip("my-chip", f).get("hbm_gb") == 96


def test_bad_hardware_files(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"chips": {"x": {"bf16_tflops": -1, "hbm_gb": 1, "hbm_tbps": 1}}}))
    with pytest.raises(ValueError, match="positive"):
        load_catalog(f)
    f.write_text(json.dumps({"chips": {"x": {"hbm_gb": 1, "hbm_tbps": 1}}}))
    with pytest.raises(ValueError, match="at least one"):
        load_catalog(f)
    with pytest.raises(ValueError, match="does not exist"):
        load_catalog(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v9'.*h800"):
        get_chip("tpu-v9")


def test_cpu_entry_is_measured(monkeypatch):
    import moeforge.device

    # the real probe times square matmuls in three dtypes (seconds on a busy 2-core machine): fake its result
    monkeypatch.setattr(moeforge.device, "matmul_tflops", lambda dev: {"float32": 0.1, "bfloat16": 0.03,
                                                                        "float16": None})
    chip = get_chip("cpu")
    assert chip.tflops("bf16") == 0.1 and "float32" in chip.sources["bf16_tflops"]
    assert chip.tflops("bf16") > 0 and chip.get("hbm_gb") > 0 and chip.get("hbm_tbps") > 0
    assert "measured" in chip.sources["bf16_tflops"] and chip.tflops("fp8") is None
