"""Validation against published figures (issue 7, item 5)."""

from __future__ import annotations

import pytest

from moeforge.config import PRESETS, get_preset
from moeforge.plan import formulas as F
from moeforge.plan.catalog import get_chip
from moeforge.plan.serve import plan_serve
from moeforge.plan.train import plan_train

V3_TOKENS, V3_GPU_HOURS, V3_GPUS = 14.8e12, 2.788e6, 2048


@pytest.fixture(scope="module")
def v3():
    return get_preset("deepseek-v3")


def test_v3_size(v3):
    n = F.model_numbers(v3)
    assert round(n["total_params"] / 1e9) == 671
    assert 37e9 <= n["active_params"] < 38e9


def test_v3_run_implied_mfu_round_trips(v3):
    h800 = get_chip("h800")
    implied = plan_train(v3, h800, V3_TOKENS, chips=V3_GPUS, chip_hours=V3_GPU_HOURS, pp=16, ep=64, zero=1)
    mfu = implied["mfu"]
    # by hand: 14.8e12 tokens x F / (2.788e6 h x 3600 s x 989e12 FLOP/s)
    assert mfu == pytest.approx(V3_TOKENS * F.train_flops_per_token(v3, 4096) / (V3_GPU_HOURS * 3600 * 989e12))
    assert 0.3 < mfu < 0.45
    back = plan_train(v3, h800, V3_TOKENS, chips=V3_GPUS, mfu=mfu, pp=16, ep=64, zero=1)
    assert back["chip_hours"] == pytest.approx(V3_GPU_HOURS, rel=0.01)
    assert back["days"] == pytest.approx(V3_GPU_HOURS / V3_GPUS / 24, rel=0.01)


def test_v3_layout_fits_on_80gb_h800(v3):
    p = plan_train(v3, get_chip("h800"), V3_TOKENS, chips=V3_GPUS, mfu=0.37, pp=16, ep=64, zero=1)
    assert p["fits"] and p["layout"]["dp"] == 128 and p["layout"]["expert_dp"] == 2
    assert p["memory_per_chip_gb"] <= 80 * 0.9
    # TOTAL parameters are in the weights: summed over the chips of one DP replica (PP16 x EP64 = 1024 chips
    # hold one copy of the experts) the weights cover the whole model
    weights = next(r for r in p["memory_table"] if r["component"] == "weights")
    assert weights["expert_gb"] * 64 * 16 >= 2 * F.model_numbers(v3)["routed"] / 1e9


def test_v3_layout_does_not_fit_without_sharding(v3):
    p = plan_train(v3, get_chip("h800"), V3_TOKENS, chips=64, mfu=0.37, pp=1, ep=1, zero=0)
    assert not p["fits"] and p["memory_per_chip_gb"] > 671 * 2  # every weight on every chip
    assert "does not fit" in p["notes"][-1]


def test_v3_mla_cache_bytes(v3):
    assert plan_serve(v3, get_chip("h800"))["kv_bytes_per_token"] == 70_272
    assert plan_serve(v3, get_chip("h800"), kv_precision="fp8")["kv_bytes_per_token"] == 35_136


V4_SIZES = {"deepseek-v4-pro": (1.6e12, 49e9), "deepseek-v4-flash": (284e9, 13e9)}


@pytest.mark.parametrize("name", list(V4_SIZES))
def test_v4_sizes(name):
    if name not in PRESETS:
        pytest.skip(f"preset {name} not there yet (the DeepSeek-V4 issue adds it)")
    n = F.model_numbers(get_preset(name))
    total, active = V4_SIZES[name]
    assert n["total_params"] == pytest.approx(total, rel=0.02)
    # V4's published active figures leave out the embedding lookup (accounting's active_params_excl_embedding);
    # "13B" for Flash is rounded: 13.27B is 2.1% above it, so the check is "within 2% or rounds to it"
    excl = n["active_params"] - n["embedding"]
    assert abs(excl / active - 1) <= 0.02 or round(excl / 1e9) == active / 1e9


def test_v4_plans_use_its_cache_layout():
    if "deepseek-v4-flash" not in PRESETS:
        pytest.skip("preset deepseek-v4-flash not there yet (the DeepSeek-V4 issue adds it)")
    from moeforge import accounting

    cfg = get_preset("deepseek-v4-flash")
    p = plan_serve(cfg, get_chip("h200"), context=1_000_000, concurrency=4)
    assert p["kv_bytes_per_token"] == accounting.kv_cache_bytes_per_token(cfg)
    assert p["kv_cache_layout"].startswith("v4")
    assert p["kv_bytes_per_token"] < 70_272 / 5  # far smaller than V3's MLA cache
