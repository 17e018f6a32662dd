import pytest
import torch

from moeforge.ops.grouped import grouped_linear, grouped_linear_reference, grouped_mm_works, pick_impl


def _case(counts, K=24, N=40):
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(counts), N, K, dtype=torch.float64, requires_grad=True)
    return x, w, counts


@pytest.mark.parametrize("counts", [[5, 0, 7, 1], [0, 0, 0, 9], [3, 3, 3, 3, 3, 3], [0, 0]])
@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_grouped_linear_matches_reference_forward_and_backward(counts, impl):
    if impl == "grouped_mm" and not grouped_mm_works("cpu", torch.float32):
        pytest.skip("grouped_mm not available")
    x, w, c = _case(counts)
    x32, w32 = (x.detach().float().requires_grad_(), w.detach().float().requires_grad_())
    y = grouped_linear(x32, w32, c, impl)
    ref = grouped_linear_reference(x, w, c)
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(x32.grad.double(), x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w32.grad.double(), w.grad, atol=1e-4, rtol=1e-4)
    # experts that got no rows get an exactly-zero gradient
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(w32.grad[e]) == 0


def test_pick_impl_rejects_unknown():
    with pytest.raises(ValueError, match="unknown grouped matmul impl"):
        pick_impl(torch.device("cpu"), torch.float32, "cutlass")
    assert pick_impl(torch.device("cpu"), torch.float32) == "loop"


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_swiglu_matches_reference(weighted):
    from moeforge.ops.swiglu import swiglu, swiglu_reference

    gu = torch.randn(37, 2 * 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(37, dtype=torch.float64, requires_grad=True) if weighted else None
    y = swiglu(gu, w)
    ref = swiglu_reference(gu, w)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [gu] + ([w] if weighted else []), g)
    ref_grads = torch.autograd.grad(ref, [gu] + ([w] if weighted else []), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(swiglu, (gu[:5].detach().requires_grad_(),
                                             None if w is None else w[:5].detach().requires_grad_()))


def test_grouped_linear_under_autocast_matches_bf16_reference():
    x, w, c = _case([4, 0, 6], K=16, N=32)
    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, c, "loop")
    assert y.dtype == torch.bfloat16
    ref = grouped_linear_reference(x.bfloat16().float(), w.bfloat16().float(), c)
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_loop_splits_long_segments_exactly(monkeypatch, dtype):
    """Segments longer than the row bucket run as a multiple of it plus a remainder (bf16/fp16 on CPU;
    forced on for fp32): outputs and both gradients still match the reference, the weight gradient
    summed over the two parts."""
    from moeforge.ops import grouped

    if dtype == torch.float32:
        monkeypatch.setattr(grouped, "row_bucket", lambda t: 8)
    step = grouped.row_bucket(torch.zeros(1, dtype=dtype))
    assert step > 1
    counts = [3 * step + 5, 0, step, 2 * step + 1, step - 1]
    assert [len(grouped.row_chunks(0, n, torch.zeros(1, dtype=dtype))) for n in counts] == [2, 1, 1, 2, 1]
    x, w, c = _case(counts)
    xl, wl = (x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_())
    y = grouped_linear(xl, wl, c, "loop")
    ref = grouped_linear_reference(x, w, c)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.3, "rtol": 0.05}
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(xl.grad.double(), x.grad, **tol)
    torch.testing.assert_close(wl.grad.double(), w.grad, **tol)
    assert torch.count_nonzero(wl.grad[1]) == 0


def test_inference_loop_few_row_segments_of_wide_experts(monkeypatch):
    """Without autograd, segments of 1-4 rows of wide fp32 experts take the threaded transposed product
    (moeforge.ops.linear.few_rows_product; MKL on its generic path) and still equal the reference; longer
    segments keep `mm`."""
    from moeforge import _mkl
    from moeforge.ops import grouped
    from moeforge.ops.linear import VECTOR_WEIGHT

    monkeypatch.setattr(_mkl, "STATE", "off: test")

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        taken = []
        real = grouped.few_rows_product
        def spy(a, w):
            out = real(a, w)
            taken.append((a.shape[0], out is not None))
            return out

        monkeypatch.setattr(grouped, "few_rows_product", spy)
        counts = torch.tensor([1, 0, 3, 9, 4])
        K = 256
        w = torch.randn(len(counts), VECTOR_WEIGHT // K, K, dtype=torch.float64)
        x = torch.randn(int(counts.sum()), K, dtype=torch.float64)
        with torch.no_grad():
            y = grouped_linear(x.float(), w.float(), counts, "loop")
        torch.testing.assert_close(y.double(), grouped_linear_reference(x, w, counts), atol=1e-3, rtol=1e-4)
        assert taken == [(1, True), (3, True), (4, True)]  # the 9-row segment went to mm
    finally:
        torch.set_num_threads(threads)
