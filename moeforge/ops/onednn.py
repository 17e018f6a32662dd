"""fp32 matrix products on CPU through oneDNN where it beats PyTorch's BLAS (MKL).

PyTorch runs fp32 `mm` / `F.linear` on CPU with MKL, which on AMD CPUs takes a generic code path at
about half the chip's fp32 rate unless moeforge._mkl overrides its vendor check (MKL then matches
oneDNN and takes transposed operands without copies, and the probe below keeps it). On the generic
path on the dev CPU (AMD EPYC, AVX-512) MKL reached ~210 GFLOP/s on
2 threads where oneDNN's fp32 kernel, which PyTorch ships for its inference ops
(`torch.ops.mkldnn._linear_pointwise`), reached ~430 GFLOP/s on the same products, with fp32
accumulation (max error against fp64 of the same order as MKL's). Products, us, 2 threads:

| product | MKL | oneDNN |
|---|---:|---:|
| (384, 512) @ (512, 512) | 998 | 466 |
| (2048, 256) @ (256, 768) | 4,028 | 1,934 |
| (512, 256) @ (256, 4096) | 6,132 | 2,648 |
| weight gradient (512, 384) @ (384, 512), transposed views | 998 | 608 |

`mm` and `linear` (with its own autograd function, whose backward products also run on oneDNN)
take that kernel for fp32 CPU tensors outside autocast and outside compiled graphs, when
`onednn_fp32_faster()` says so: a one-time probe that times both kernels on one product and
takes oneDNN only at <= 0.8x MKL's time (so a CPU where MKL is at home keeps MKL);
`MOEFORGE_ONEDNN_FP32=1` / `0` forces the choice, and PyTorch's own switch
(`torch.backends.mkldnn.flags(enabled=False)`) turns it off. oneDNN builds a kernel per new product shape
(~0.35 ms, then cached), so callers with data-dependent row counts bound them
(moeforge.ops.grouped.row_bucket).
"""

from __future__ import annotations

import functools
import os
import time

import torch

MIN_MACS = 2**21  # products smaller than this stay on PyTorch's default (see takes_onednn)

@functools.cache
def onednn_fp32_faster() -> bool:
    """Does oneDNN's fp32 product beat PyTorch's default on this CPU (measured once per process)?"""
    forced = os.environ.get("MOEFORGE_ONEDNN_FP32")
    if forced in ("0", "1"):
        return forced == "1"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        # outside any active dispatch mode (a FLOP counter, a tracer) that the first product might meet
        with _disable_current_modes(), torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(256, 512, generator=g), torch.randn(512, 512, generator=g)
            best = {"blas": float("inf"), "onednn": float("inf")}
            for _ in range(6):  # interleaved rounds, best of each: load from elsewhere hits both alike
                for name, fn in (("blas", lambda: x @ w.t()), ("onednn", lambda: _lp(x, w))):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
        return best["onednn"] <= 0.8 * best["blas"]
    except Exception:  # noqa: BLE001 - any failure means "keep the default"
        return False


def _register_flops() -> None:
    """Let torch.utils.flop_counter count the oneDNN product like the mm it replaces (accounting's tests
    and anyone profiling FLOPs see the same totals either way)."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]


_register_flops()


def _lp(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T (+ bias) with oneDNN's fp32 kernel (strided views allowed)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def takes_onednn(*tensors: torch.Tensor, macs: int | None = None) -> bool:
    """Run a product of these tensors (of `macs` multiply-adds; None: any size) on oneDNN? fp32 CPU
    tensors, no autocast, not compiling, faster here, and at least MIN_MACS: oneDNN's call costs ~12 us
    on the dev CPU where MKL's small-product path costs 3-8 us, so decode-sized products stay on MKL
    ((n, 256) @ (256, 256), us MKL / oneDNN: 1 row 3.9 / 13.4, 8 rows 16.1 / 17.3, 32 rows 26.5 / 23.6,
    64 rows 46.8 / 31.5)."""
    return ((macs is None or macs >= MIN_MACS) and torch.backends.mkldnn.enabled  # the user's switch for oneDNN
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and onednn_fp32_faster())


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) on oneDNN, which copies its first operand into a contiguous one when it is not
    (a transposed view: weight gradients). That copy is a slow transpose (a 2048 x 256 fp32 one took
    229 us on the dev CPU, 8x a plain copy), so of the two forms, a @ b and (b^T @ a^T)^T, take the one
    that transposes fewer elements: a's, or b^T's plus the (M, N) result's. For the tiny preset's nine
    Linear weight-gradient shapes at 2,048 rows that picked the faster form each time (fp32, 2 threads:
    27.4 -> 22.9 ms per training step, e.g. kv_b_proj's 64 -> 256 gradient 497 -> 323 us)."""
    copy_a = 0 if a.is_contiguous() else a.numel()
    copy_bt = (0 if b.t().is_contiguous() else b.numel()) + a.shape[0] * b.shape[1]
    if copy_bt < copy_a:
        return _lp(b.t(), a).t().contiguous()
    return _lp(a, b.t())


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N), on oneDNN where `takes_onednn` (its result copied into `out` when given, as
    the oneDNN op has no out= form), else `torch.mm`. No autograd: for code inside autograd functions."""
    if not takes_onednn(a, b, macs=a.shape[0] * a.shape[1] * b.shape[1]):
        return torch.mm(a, b, out=out) if out is not None else a @ b
    y = _product(a, b)
    return y if out is None else out.copy_(y)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _lp(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gy = gy.contiguous()
        gx = _lp(gy, weight.t()) if ctx.needs_input_grad[0] else None
        gw = _product(gy.t(), x) if ctx.needs_input_grad[1] else None
        gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on oneDNN, forward and backward: x (..., K), weight (N, K) -> (..., N). Callers check
    `takes_onednn` first."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _Linear.apply(x2, weight, bias)
    else:
        y = _lp(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
