import pytest
import torch

from moeforge.ops import native, onednn, routed
from moeforge.ops.grouped import ROW_BUCKET, grouped_linear, row_bucket
from moeforge.ops.permute import combine, dispatch
from moeforge.ops.routed import routed_swiglu
from moeforge.ops.swiglu import swiglu

N, D, I, E, K = 23, 16, 8, 6, 3


def _unfused(x, w1, w2, tok, counts, weights, limit, acc):
    gu = grouped_linear(dispatch(x, tok), w1, counts, "loop")
    if limit:
        g, u = gu.chunk(2, dim=-1)
        gu = torch.cat([g.clamp(max=limit), u.clamp(-limit, limit)], dim=-1)
    return combine(grouped_linear(swiglu(gu, weights), w2, counts, "loop"), tok, x.shape[0], acc)


def _problem(dtype=torch.float32, empty_expert=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    w1 = torch.randn(E, 2 * I, D, generator=g, dtype=dtype)
    w2 = torch.randn(E, D, I, generator=g, dtype=dtype) * 0.3
    scores = torch.rand(N, E, generator=g)
    if empty_expert:
        scores[:, 2] = -1.0  # expert 2 gets no token: its weight gradients must be zeros
    idx = scores.topk(K, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    counts = torch.bincount(idx, minlength=E)
    weights = torch.rand(N * K, generator=g)
    return x, w1, w2, order // K, counts, weights


def _grads(fn, x, w1, w2, tok, counts, weights, limit, acc):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, weights)]
    xx, ww1, ww2, wt = leaves
    y = fn(xx, ww1, ww2, tok, counts, wt, limit, acc)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y] + [t.grad for t in leaves]


@pytest.fixture
def python_path(monkeypatch):
    """The Python segment loop, where fp32 on CPU would otherwise take the native kernel."""
    monkeypatch.setattr(routed, "takes_native", lambda *a: False)


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_fused_routed_experts_equal_the_unfused_route(limit, python_path):
    """Outputs and all four gradients equal dispatch -> grouped matmuls -> combine, bit for bit in fp32;
    with the V4 clamp active on part of the entries, and an expert that receives no token."""
    prob = _problem()
    if limit:
        gu = prob[0] @ prob[1][0].t()
        assert (gu.abs() > limit).float().mean() > 0.2  # the clamp really cuts
    got = _grads(routed_swiglu, *prob, limit, torch.float32)
    want = _grads(_unfused, *prob, limit, torch.float32)
    for name, a, b in zip(["out", "x", "gate_up", "down", "weights"], got, want):
        if limit:  # silu of a clamped copy vs of a strided view: the vector kernels may differ in the last bit
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name
    assert not got[2][2].any() and not got[3][2].any()  # the empty expert
    assert got[2][0].any()


def test_fused_routed_experts_bf16_accumulate_in_fp32(python_path):
    """bf16 weights and rows: output and input gradient summed over experts in fp32, so at least as
    close to an fp64 evaluation as the unfused route, whose input gradient sums in bf16."""
    prob = _problem(torch.bfloat16, empty_expert=False)
    got = _grads(routed_swiglu, *prob, 0.0, torch.float32)
    want = _grads(_unfused, *prob, 0.0, torch.float32)
    ref = _grads(_unfused, *[t.double() if t.is_floating_point() else t for t in prob], 0.0, torch.float64)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for name, a, b in zip(["out", "gate_up", "down", "weights"], got[:1] + got[2:], want[:1] + want[2:]):
        assert torch.equal(a, b), name
    err = [(g[1].double() - ref[1]).abs().max() for g in (got, want)]
    assert err[0] <= err[1]
    assert err[0] < 0.02 * ref[1].abs().max()  # bf16 rounding of the products, nothing worse


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_chunked_segments_change_nothing(monkeypatch, limit):
    """Where products run on oneDNN (bf16/fp16 on CPU; fp32 where it is faster) the fused pass multiplies
    each segment padded with zero rows to a multiple of ROW_BUCKET, and the segment loop splits it into a
    multiple plus the remainder: forced on in fp32, the outputs and all gradients still equal the
    unbucketed unfused route's, empty and short segments included."""
    from moeforge.ops import grouped

    g = torch.Generator().manual_seed(1)
    n, e, k = 150, 6, 3
    x, w1 = torch.randn(n, D, generator=g), torch.randn(e, 2 * I, D, generator=g)
    w2 = torch.randn(e, D, I, generator=g) * 0.3
    scores = torch.rand(n, e, generator=g)
    scores[:, 1] = -1.0  # empty
    scores[:140, 4] = -1.0  # short: at most 10 rows
    idx = scores.topk(k, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    counts = torch.bincount(idx, minlength=e)
    assert counts.max() > 32 and 0 < counts[4] <= 10
    prob = (x, w1, w2, order // k, counts, torch.rand(n * k, generator=g))
    monkeypatch.setattr(grouped, "row_bucket", lambda t: 1)
    monkeypatch.setattr(routed, "row_bucket", lambda t: 1)
    want = _grads(_unfused, *prob, limit, torch.float32)
    monkeypatch.setattr(grouped, "row_bucket", lambda t: 32)
    monkeypatch.setattr(routed, "row_bucket", lambda t: 32)
    got = _grads(routed_swiglu, *prob, limit, torch.float32)
    for name, a, b in zip(["out", "x", "gate_up", "down", "weights"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert not got[2][1].any()


def test_bf16_segments_are_chunked_and_stay_accurate():
    """In bf16 on CPU, segments run padded to a multiple of ROW_BUCKET rows; the result stays as close to fp64
    as the unfused route."""

    assert row_bucket(torch.zeros(1, dtype=torch.bfloat16)) == ROW_BUCKET
    assert row_bucket(torch.zeros(1)) == (ROW_BUCKET if onednn.takes_onednn(torch.zeros(1)) else 1)
    assert row_bucket(torch.zeros(1, dtype=torch.float64)) == 1
    g = torch.Generator().manual_seed(2)
    n, e, k = 150, 6, 3
    x, w1 = torch.randn(n, D, generator=g), torch.randn(e, 2 * I, D, generator=g)
    w2 = torch.randn(e, D, I, generator=g) * 0.3
    idx = torch.rand(n, e, generator=g).topk(k, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    counts = torch.bincount(idx, minlength=e)
    assert (counts % 32 != 0).any() and counts.min() > 32
    wts = torch.rand(n * k, generator=g)
    prob16 = (x.bfloat16(), w1.bfloat16(), w2.bfloat16(), order // k, counts, wts)
    prob64 = (x.double(), w1.double(), w2.double(), order // k, counts, wts.double())
    got = _grads(routed_swiglu, *prob16, 0.0, torch.float32)
    unf = _grads(_unfused, *prob16, 0.0, torch.float32)
    ref = _grads(_unfused, *prob64, 0.0, torch.float64)
    for name, a, b, r in zip(["out", "x", "gate_up", "down", "weights"], got, unf, ref):
        err_got = (a.double() - r).abs().max()
        err_unf = (b.double() - r).abs().max()
        assert err_got <= 1.5 * err_unf + 1e-3 * r.abs().max(), name


# ------------------------------------------------------------------ the native kernel (moeforge/ops/csrc)
@pytest.fixture
def native_ops():
    if native.ops() is None:
        pytest.skip(f"native kernels unavailable here: {native.STATE}")
    return native.ops()


def test_native_kernels_build_on_linux_with_a_compiler():
    """Where the project's CI and dev machines run (Linux x86-64 with a C++ compiler) the kernels must build:
    a silent fallback would hide a broken build."""
    import platform
    import shutil

    if not (platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("c++")):
        pytest.skip("not Linux x86-64 with a C++ compiler")
    assert native.ops() is not None, native.STATE
    assert native.STATE == "on"


def _bigger_problem():
    """150 tokens, 6 experts, top-3: segments of ~75 rows (several parallel tasks each), one empty expert."""
    g = torch.Generator().manual_seed(3)
    n, e, k = 150, 6, 3
    x, w1 = torch.randn(n, D, generator=g), torch.randn(e, 2 * I, D, generator=g)
    w2 = torch.randn(e, D, I, generator=g) * 0.3
    scores = torch.rand(n, e, generator=g)
    scores[:, 1] = -1.0
    idx = scores.topk(k, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    return x, w1, w2, order // k, torch.bincount(idx, minlength=e), torch.rand(n * k, generator=g)


@pytest.mark.parametrize("limit", [0.0, 1.5])
@pytest.mark.parametrize("make", [_problem, _bigger_problem])
def test_native_kernel_equals_the_python_loop(native_ops, monkeypatch, make, limit):
    """fp32 on CPU takes the native kernel; its output and four gradients equal the Python loop's up to fp32
    rounding (vectorised exp, another summation order), the empty expert's weight gradients are zeros."""
    prob = make()
    got = _grads(routed_swiglu, *prob, limit, torch.float32)
    assert type(got[0].grad_fn).__name__ == "_NativeExpertsBackward"
    monkeypatch.setattr(routed, "takes_native", lambda *a: False)
    want = _grads(routed_swiglu, *prob, limit, torch.float32)
    assert type(want[0].grad_fn).__name__ == "_RoutedSwiGLUBackward"
    for name, a, b in zip(["out", "x", "gate_up", "down", "weights"], got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    empty = int((prob[4] == 0).nonzero()[0])
    assert not got[2][empty].any() and not got[3][empty].any()


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_native_kernel_computes_only_the_gradients_wanted(native_ops, limit):
    """Each of the four gradients alone (the other inputs frozen) equals its value when all are wanted, and
    the others stay None."""
    prob = _bigger_problem()
    probe = torch.linspace(-1, 1, prob[0].numel()).view_as(prob[0])

    def run(wanted):
        x, w1, w2, wts = (t.detach().clone().requires_grad_(i in wanted) for i, t in enumerate(prob[:3] + prob[5:]))
        (routed_swiglu(x, w1, w2, prob[3], prob[4], wts, limit) * probe).sum().backward()
        return [x.grad, w1.grad, w2.grad, wts.grad]

    every = run({0, 1, 2, 3})
    for i in range(4):
        alone = run({i})
        torch.testing.assert_close(alone[i], every[i], atol=1e-6, rtol=1e-6)
        assert all(g is None for j, g in enumerate(alone) if j != i)


def test_native_kernel_products_are_counted(native_ops, monkeypatch):
    """torch.utils.flop_counter sees the kernel's products: forward + backward, all gradients or only the
    input's, count what the Python loop counts."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w1, w2, tok, counts, wts = _bigger_problem()

    def count(all_grads):
        leaves = [t.clone().requires_grad_(all_grads or i == 0) for i, t in enumerate((x, w1, w2, wts))]
        with FlopCounterMode(display=False) as fc:
            routed_swiglu(leaves[0], leaves[1], leaves[2], tok, counts, leaves[3]).sum().backward()
        return fc.get_total_flops()

    got = [count(True), count(False)]
    monkeypatch.setattr(routed, "takes_native", lambda *a: False)
    want = [count(True), count(False)]
    assert got == want and want[0] > want[1] > 0


_BLAS_SCRIPT = """
import sys, torch
from moeforge.ops import native
sys.path.insert(0, {tests!r})
from test_routed import _bigger_problem
lib = native.ops()
assert native.STATE == "on", native.STATE
torch.set_num_threads(2)
x, w1, w2, tok, counts, wts = _bigger_problem()
out = [torch.tensor(lib.direct_blas())]
for lanes in (1, 2):
    lib.set_lanes(lanes)
    y, gu = lib.experts_fwd(x, w1, w2, tok, counts, wts, 0.0, 1)
    out += [y, *lib.experts_bwd(y * 0.5, x, w1, w2, tok, counts, wts, gu, 0.0, 1, True, True, True, True)]
torch.save(out, sys.argv[1])
"""


def test_native_products_through_aten_give_the_same_numbers(native_ops, tmp_path):
    """Where PyTorch has MKL the kernel calls its sgemm directly for the fp32 products; MOEFORGE_NATIVE_BLAS=0
    sends them through at::mm_out instead (what builds without MKL do): the same numbers, bit for bit, in one
    lane and in two."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(_BLAS_SCRIPT.format(tests=str(Path(__file__).parent)))
    results = []
    for flag in ("1", "0"):
        path = tmp_path / f"blas{flag}.pt"
        env = {**os.environ, "MOEFORGE_NATIVE_BLAS": flag}
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=300)
        results.append(torch.load(path))
    direct = [bool(r.pop(0)) for r in results]
    assert direct == [torch.backends.mkl.is_available(), False]
    assert len(results[0]) == 10
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_kernel_rejects_bad_input(native_ops):
    """Shapes, counts and token ids are checked before any pointer is followed: an error, not a crash."""
    x, w1, w2, tok, counts, wts = _bigger_problem()
    with pytest.raises(RuntimeError, match="mismatched shapes"):
        native_ops.experts_fwd(x, w1, w2[:, :, :-1].contiguous(), tok, counts, wts, 0.0, 1)
    with pytest.raises(RuntimeError, match="counts must sum"):
        native_ops.experts_fwd(x, w1, w2, tok, counts + 1, wts, 0.0, 1)
    bad = tok.clone()
    bad[5] = x.shape[0]
    with pytest.raises(RuntimeError, match="token out of range"):
        native_ops.experts_fwd(x, w1, w2, bad, counts, wts, 0.0, 1)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        native_ops.experts_fwd(x.double(), w1, w2, tok, counts, wts, 0.0, 1)
    out, gu = native_ops.experts_fwd(x, w1, w2, tok, counts, wts, 0.0, 1)
    with pytest.raises(RuntimeError, match="mismatched gradient or saved shapes"):
        native_ops.experts_bwd(out, x, w1, w2, tok, counts, wts, gu[1:].contiguous(), 0.0, 1, True, True, True, True)


@pytest.fixture
def lanes(native_ops):
    """Force the native kernel's lane count (restored to its own rule afterwards)."""
    yield native_ops.set_lanes
    native_ops.set_lanes(0)


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_native_lanes_agree_and_repeat_exactly(native_ops, lanes, limit):
    """Experts side by side on 2 or 3 lanes (3 lanes on fewer threads too) give the one-lane results up to fp32
    rounding, and the same lane count gives bit-identical results call after call (the plan depends only on
    the row counts): a resumed training run must repeat an uninterrupted one."""
    prob = _bigger_problem()
    runs = {}
    for n in (1, 2, 3, 2):
        lanes(n)
        runs.setdefault(n, []).append(_grads(routed_swiglu, *prob, limit, torch.float32))
    for n in (2, 3):
        for name, a, b in zip(["out", "x", "gate_up", "down", "weights"], runs[n][0], runs[1][0]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"{n} lanes: {name}")
    for a, b in zip(runs[2][0], runs[2][1]):
        assert torch.equal(a, b)


def test_native_lane_rule(native_ops, monkeypatch):
    """Without a forced count: side by side on all threads when there are at least two experts with rows per
    thread and the extra accumulators fit in the gate|up activations' memory; else one lane. Observed through
    the summation order: one lane reproduces set_lanes(1) bit for bit."""
    x, w1, w2, tok, counts, wts = _bigger_problem()  # 5 experts with rows, N*D = 2,400 <= M*2I = 7,200

    def out(n=0):
        native_ops.set_lanes(n)
        try:
            return native_ops.experts_fwd(x, w1, w2, tok, counts, wts, 0.0, 1)[0]
        finally:
            native_ops.set_lanes(0)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one, two = out(1), out(2)
        assert not torch.equal(one, two)  # the two summation orders differ somewhere (else the test shows nothing)
        assert torch.equal(out(), two)  # 5 experts >= 2 * 2 threads, 2,400 <= 7,200
        torch.set_num_threads(3)
        assert torch.equal(out(), one)  # 5 experts < 2 * 3 threads
        torch.set_num_threads(1)
        assert torch.equal(out(), one)
        # top-3 of experts of width 2: an extra (N, D) accumulator would outweigh the (M, 2I) activations
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(5)
        n, e = 200, 6
        idx = torch.rand(n, e, generator=g).topk(3, dim=-1).indices.flatten()
        order = idx.argsort(stable=True)
        x, w1, w2 = torch.randn(n, D, generator=g), torch.randn(e, 4, D, generator=g), torch.randn(e, D, 2, generator=g)
        tok, counts, wts = order // 3, torch.bincount(idx, minlength=e), torch.rand(3 * n, generator=g)
        assert (counts > 0).all() and n * D > 3 * n * 2 * 2
        assert torch.equal(out(), out(1)) and not torch.equal(out(2), out(1))
    finally:
        torch.set_num_threads(threads)


def test_native_kernel_with_no_pairs(native_ops):
    """No token-expert pairs at all (every count zero): the output and the input gradient are zeros, the expert
    weights' gradients zeros, nothing left unwritten."""
    x, w1, w2 = torch.randn(7, D), torch.randn(4, 2 * I, D), torch.randn(4, D, I)
    empty, counts = torch.zeros(0, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    out, gu = native_ops.experts_fwd(x, w1, w2, empty, counts, torch.zeros(0), 0.0, 1)
    assert torch.equal(out, torch.zeros(7, D)) and gu.shape == (0, 2 * I)
    gx, gw1, gw2, gw = native_ops.experts_bwd(torch.randn(7, D), x, w1, w2, empty, counts, torch.zeros(0), gu, 0.0,
                                              1, True, True, True, True)
    assert torch.equal(gx, torch.zeros(7, D)) and not gw1.any() and not gw2.any() and gw.numel() == 0


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_native_kernel_in_bf16(native_ops, monkeypatch, limit):
    """bf16 on CPU (autocast's dtype there) takes the native kernel too: products in bf16 on segments padded to the
    row bucket, every elementwise step in fp32, the output and the input gradient summed in fp32. Each result is at
    least as close to an fp64 evaluation as the Python loop's (which rounds after every elementwise step)."""
    x, w1, w2, tok, counts, wts = _bigger_problem()  # segments of ~75 rows: padded to 96
    prob16 = (x.bfloat16(), w1.bfloat16(), w2.bfloat16(), tok, counts, wts)
    prob64 = (x.double(), w1.double(), w2.double(), tok, counts, wts.double())
    got = _grads(routed_swiglu, *prob16, limit, torch.float32)
    assert type(got[0].grad_fn).__name__ == "_NativeExpertsBackward"
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    monkeypatch.setattr(routed, "takes_native", lambda *a: False)
    loop = _grads(routed_swiglu, *prob16, limit, torch.float32)
    ref = _grads(_unfused, *prob64, limit, torch.float64)
    for name, a, b, r in zip(["out", "x", "gate_up", "down", "weights"], got, loop, ref):
        err_got, err_loop = (a.double() - r).abs().max(), (b.double() - r).abs().max()
        assert err_got <= 1.1 * err_loop + 1e-3 * r.abs().max(), name
        if not limit:  # (with the clamp, bf16 rounding moves entries across its bounds: the mask differs locally)
            assert err_got < 0.03 * r.abs().max(), name  # bf16 rounding of the products, nothing worse
