"""fp32 products on oneDNN (moeforge.ops.onednn) == PyTorch's, forward and backward, and taken only where meant."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moeforge.ops import onednn
from moeforge.ops.linear import linear

needs_op = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN linear op")


@needs_op
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear_forward_and_backward(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 37, 48, requires_grad=True)
    w = torch.randn(24, 48, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    go = torch.randn(3, 37, 24)
    got = onednn.linear(x, w, b)
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inputs = (x, w) + ((b,) if bias else ())
    for g, r in zip(torch.autograd.grad(got, inputs, go), torch.autograd.grad(want, inputs, go), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(onednn.linear(x, w, b), want, rtol=1e-5, atol=1e-5)


@needs_op
def test_onednn_mm_matches_matmul_on_transposed_views(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: True)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    torch.manual_seed(1)
    a, b = torch.randn(40, 33), torch.randn(50, 33)
    torch.testing.assert_close(onednn.mm(a, b.t()), a @ b.t(), rtol=1e-5, atol=1e-5)  # forward form
    torch.testing.assert_close(onednn.mm(a.t(), a), a.t() @ a, rtol=1e-5, atol=1e-4)  # weight-gradient form


@needs_op
# first operand: x^T (8 x 200) for a wide output, gy^T (8 x 200) for a narrow one; never the 64-row one
@pytest.mark.parametrize(("out_features", "in_features", "first"), [(64, 8, (8, 200)), (8, 64, (8, 200))])
def test_weight_gradient_transposes_the_smaller_operand(monkeypatch, out_features, in_features, first):
    """gy^T @ x computed as written when gy (200 x out) is the smaller transpose, else as (x^T @ gy)^T:
    oneDNN's first operand is the one copied. Both forms equal PyTorch's product, through mm and Linear."""
    monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: True)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    seen = []
    real = onednn._lp
    monkeypatch.setattr(onednn, "_lp", lambda x, w, b=None: seen.append(tuple(x.shape)) or real(x, w, b))
    torch.manual_seed(2)
    gy, x = torch.randn(200, out_features), torch.randn(200, in_features)
    torch.testing.assert_close(onednn.mm(gy.t(), x), gy.t() @ x, rtol=1e-5, atol=1e-4)
    assert seen == [first]
    w = torch.randn(out_features, in_features, requires_grad=True)
    (gw,) = torch.autograd.grad(onednn.linear(x, w), w, gy)
    torch.testing.assert_close(gw, gy.t() @ x, rtol=1e-5, atol=1e-4)
    assert gw.is_contiguous()


def test_taken_only_for_fp32_cpu_outside_autocast_and_compile(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: True)
    x = torch.zeros(2, 2)
    assert onednn.takes_onednn(x, x) and onednn.takes_onednn(x, x, macs=onednn.MIN_MACS)
    assert not onednn.takes_onednn(x, x, macs=onednn.MIN_MACS - 1)  # decode-sized products stay on MKL
    assert not onednn.takes_onednn(x.double(), x.double())
    assert not onednn.takes_onednn(x.bfloat16(), x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.takes_onednn(x, x)  # autocast decides the dtype: F.linear / mm run in bf16
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # as torch.backends.mkldnn.flags(enabled=False)
    assert not onednn.takes_onednn(x, x)
    monkeypatch.undo()
    monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: False)
    assert not onednn.takes_onednn(x, x)


def test_linear_routes_fp32_training_to_onednn_when_faster(monkeypatch):
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(4, 8)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: False)
    linear(x, w)
    assert calls == []
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: True)
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert calls == [1]


@pytest.mark.parametrize("forced", ["0", "1"])
def test_environment_variable_forces_the_choice(forced):
    code = "from moeforge.ops import onednn; print(onednn.onednn_fp32_faster())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MOEFORGE_ONEDNN_FP32": forced, "PATH": ""}).stdout.strip()
    assert out == str(forced == "1")


def test_flop_counter_counts_the_onednn_product(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(onednn, "onednn_fp32_faster", lambda: True)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    x, w = torch.randn(5, 7, 16), torch.randn(12, 16)
    with FlopCounterMode(display=False) as fc:
        linear(x, w)
    assert fc.get_total_flops() == 2 * 35 * 16 * 12


def test_probe_is_invisible_to_an_active_flop_counter():
    """The one-time probe times real products; a FLOP counter open when it first runs must not see them."""
    from torch.utils.flop_counter import FlopCounterMode

    onednn.onednn_fp32_faster.cache_clear()
    try:
        with FlopCounterMode(display=False) as fc:
            onednn.onednn_fp32_faster()
        assert fc.get_total_flops() == 0
    finally:
        onednn.onednn_fp32_faster.cache_clear()
