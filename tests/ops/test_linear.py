"""The compiled small-row linear (moeforge.ops.linear) == F.linear, and only kicks in where it should."""

import pytest
import torch
import torch.nn.functional as F

from moeforge.ops import onednn
from moeforge.ops.linear import SMALL_ROWS, VECTOR_WEIGHT, WIDE_WEIGHT, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS, SMALL_ROWS + 1])
def test_compiled_small_rows_equal_f_linear(rows):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    x = torch.randn(rows, 1, 64)
    seen = []

    def fn(x):
        seen.append(torch.compiler.is_compiling())
        return lin(x)

    graphs = []

    def capture(gm, example_inputs):  # record the traced graph, run it as is
        graphs.append(gm.code)
        return gm.forward

    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, dynamic=True)(x), want, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        torch.compile(fn, fullgraph=True, dynamic=True, backend=capture)(x)
    assert seen == [True, True]  # traced inside the compiler each time
    assert ("linear" in graphs[0]) == (rows > SMALL_ROWS)  # the broadcast form only for few rows


def test_small_row_form_is_taken_only_when_compiling_without_grad(monkeypatch):
    """Outside a compiled graph, or with autograd on, `linear` is F.linear itself (bit-equal, and the
    broadcast form is never built)."""
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(onednn, "takes_onednn", lambda *t, **k: False)  # this test is about the small-row forms
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(linear(x, w), real(x, w))
    assert torch.equal(linear(x, w), real(x, w))
    assert len(calls) == 2


def test_linear_keeps_nn_linear_state_dict():
    a = Linear(8, 4, bias=False)
    b = torch.nn.Linear(8, 4, bias=False)
    b.load_state_dict(a.state_dict())
    assert list(a.state_dict()) == ["weight"] and isinstance(a, torch.nn.Linear)


@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS])
def test_eager_wide_weight_uses_threaded_product_with_f_linear_values(rows, monkeypatch):
    """Eager fp32 inference on few rows of a wide weight, MKL on its generic path: (W @ x^T)^T (one row padded
    to two columns), equal to F.linear up to summation order; one row of a narrower weight stays F.linear."""
    from moeforge import _mkl

    monkeypatch.setattr(_mkl, "STATE", "off: test")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, b = torch.randn(VECTOR_WEIGHT // 256, 256), torch.randn(VECTOR_WEIGHT // 256)
        x = torch.randn(rows, 1, 256)
        calls = []
        real = F.linear
        monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or real(*a))
        with torch.no_grad():
            for bias in (None, b):
                got = linear(x, w, bias)
                assert got.shape == (rows, 1, w.shape[0]) and got.is_contiguous()
                torch.testing.assert_close(got, real(x, w, bias), rtol=1e-5, atol=1e-4)
            assert calls == []  # the transposed product, not F.linear
            narrow = torch.randn(WIDE_WEIGHT // 256, 256)
            torch.testing.assert_close(linear(x, narrow), real(x, narrow), rtol=1e-5, atol=1e-4)
            assert calls == ([1] if rows == 1 else [])  # one row needs VECTOR_WEIGHT, more rows WIDE_WEIGHT
            assert torch.equal(linear(x.bfloat16(), w.bfloat16()), real(x.bfloat16(), w.bfloat16()))  # bf16: F.linear
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS])
def test_with_mkl_fast_kernels_only_a_lone_row_is_doubled(rows, monkeypatch):
    """Where moeforge._mkl put MKL on its fast kernels, F.linear beats the transposed product: 2-4 rows keep
    F.linear, and one row against a wide weight runs as a two-row F.linear; same values either way."""
    from moeforge import _mkl

    monkeypatch.setattr(_mkl, "STATE", "on")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(VECTOR_WEIGHT // 256, 256)
        x = torch.randn(rows, 1, 256)
        shapes = []
        real = F.linear
        monkeypatch.setattr(F, "linear", lambda a, *r: shapes.append(tuple(a.shape)) or real(a, *r))
        with torch.no_grad():
            got = linear(x, w)
        torch.testing.assert_close(got, real(x, w), rtol=1e-5, atol=1e-4)
        assert shapes[0] == ((2, 256) if rows == 1 else (rows, 1, 256))
    finally:
        torch.set_num_threads(threads)
