"""Grouped matmul over contiguous per-expert segments: y[seg e] = x[seg e] @ w[e]^T.

Rows of x are sorted by expert; `counts[e]` rows belong to expert e. Three
implementations of the same product:

* "loop": one `mm` per non-empty segment, forward and backward written in place into
  preallocated outputs (no concatenation, no zero-filled gradient per expert); without
  autograd (inference) no autograd function at all, and segments of a few rows of wide fp32
  experts take the threaded transposed product of moeforge.ops.linear (decode steps on CPU);
* "grouped_mm": `torch._grouped_mm` forward *and* backward (our own autograd function:
  the stock backward fails on CPU in torch 2.13 with "Invalid strides/sizes");
* `grouped_linear_reference`: gathers each row's weight matrix and runs a batched
  matmul — slow and memory-hungry, the plain reference the others are tested against.

`pick_impl` chooses per device by a probe (does grouped_mm run forward and backward
in this dtype?) and by measurement (benchmarks/moe_layer.py): on CPU both run at the
same speed, and "loop" is kept as the default because it needs no private API.

Shapes: M sorted rows, K in-features, N out-features, E experts.
"""

from __future__ import annotations

import functools

import torch

from moeforge.ops import onednn
from moeforge.ops.linear import SMALL_ROWS, few_rows_product

IMPLS = ("auto", "loop", "grouped_mm")


def grouped_linear_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    expert_of_row = torch.repeat_interleave(torch.arange(w.shape[0], device=x.device), counts)
    return torch.bmm(x.unsqueeze(1), w[expert_of_row].transpose(1, 2)).squeeze(1)


ROW_BUCKET = 32  # reduced-precision CPU matmuls (oneDNN): expert segments take row counts in steps of this


def row_bucket(x: torch.Tensor) -> int:
    """Rows per bucket for this input. oneDNN, which runs bf16/fp16 matmuls on CPU (and fp32 where
    moeforge.ops.onednn picks it), builds a kernel for
    every new shape (0.4-0.9 ms each on the dev CPU, 5-10x the product itself) and keeps a bounded cache
    of them: with a fresh row count per expert per step, a bf16 training run spent its first ~75 steps
    ramping from 6,300 to 9,500 tokens/s, and a bf16 prefill of a new prompt took 2-3x its cached time.
    Segments of more than ROW_BUCKET rows are therefore multiplied as a multiple of ROW_BUCKET rows and
    the remainder (`row_chunks`, `mm_rows`, `mm_sum_rows`; the segment loop here and the fused routed
    experts in moeforge.ops.routed). Smaller segments (decode steps) are at most ROW_BUCKET shapes
    already and stay whole."""
    low = x.dtype in (torch.bfloat16, torch.float16)
    return ROW_BUCKET if x.device.type == "cpu" and (low or onednn.takes_onednn(x)) else 1


def row_chunks(start: int, n: int, x: torch.Tensor) -> list[slice]:
    """Rows start..start+n of a segment as the slices to multiply: for bf16/fp16 on CPU a segment
    longer than ROW_BUCKET is split into a multiple of ROW_BUCKET rows and a remainder, so every
    product has one of a bounded set of row counts (see row_bucket); elsewhere one slice."""
    step = row_bucket(x)
    bulk = n - n % step if n > step else n
    parts = [slice(start, start + bulk)]
    if bulk < n:
        parts.append(slice(start + bulk, start + n))
    return parts


def mm_rows(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """out[rows] = a[rows] @ b for each part of `row_chunks`; returns out (fp32 on oneDNN where it is
    faster: moeforge.ops.onednn.mm)."""
    for rows in parts:
        onednn.mm(a[rows], b, out=out[rows])
    return out


def mm_sum_rows(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """out = a^T @ b summed over the row parts of `row_chunks` (a weight gradient); returns out."""
    onednn.mm(a[parts[0]].t(), b[parts[0]], out=out)
    for rows in parts[1:]:  # the remainder (< ROW_BUCKET rows), added in place
        out.addmm_(a[rows].t(), b[rows])
    return out


class _LoopMM(torch.autograd.Function):
    """One `mm` per non-empty segment (two for bf16/fp16 on CPU: `row_chunks`), written straight
    into preallocated outputs.

    Forward and backward write each segment's result in place (`out=`), so there is no
    concatenation of outputs and no stacking of per-expert weight gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = counts.tolist()
        ctx.save_for_backward(x, w)
        return _loop_forward(x, w, ctx.sizes)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        gw = w.new_empty(w.shape) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                if gw is not None:
                    gw[e].zero_()  # an expert that saw no token gets a zero gradient
                continue
            parts = row_chunks(start, n, x)
            if gx is not None:
                mm_rows(gy, w[e], gx, parts)
            if gw is not None:
                mm_sum_rows(gy, x, gw[e], parts)
            start += n
        return gx, gw, None


def _loop_forward(x: torch.Tensor, w: torch.Tensor, sizes: list[int], inference: bool = False) -> torch.Tensor:
    """y[seg e] = x[seg e] @ w[e]^T for segments of `sizes` rows. With `inference`, segments of at most
    SMALL_ROWS rows take `few_rows_product` where it is faster (fp32 CPU, wide experts: decode steps)."""
    y = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            few = few_rows_product(x[start : start + n], w[e]) if inference and n <= SMALL_ROWS else None
            if few is None:
                mm_rows(x, w[e].t(), y, row_chunks(start, n, x))
            else:
                y[start : start + n] = few
        start += n
    return y


def _loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _LoopMM.apply(x.contiguous(), w, counts)
    return _loop_forward(x.contiguous(), w, counts.tolist(), inference=not torch.is_grad_enabled())


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        x, w, offs = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch._grouped_mm(gy, w, offs=offs) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            # (N, M) x (M, K) with M split by offs -> (E, N, K); empty segments give zeros.
            # grouped_mm wants 16-byte-aligned strides: pad M with zero rows (they add nothing).
            pad = -x.shape[0] % max(1, 16 // x.element_size())
            gy_t = torch.nn.functional.pad(gy, (0, 0, 0, pad)).t().contiguous()
            gw = torch._grouped_mm(gy_t, torch.nn.functional.pad(x, (0, 0, 0, pad)), offs=offs)
        return gx, gw, None


def _grouped(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    offs = counts.cumsum(0).to(torch.int32)
    return _GroupedMM.apply(x.contiguous(), w, offs)


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype): does our grouped_mm path run forward and backward?"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(13, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(3, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        y = _grouped(x, w, torch.tensor([5, 0, 8], device=device_type))
        y.sum().backward()
        ref = _loop(x.detach().float(), w.detach().float(), torch.tensor([5, 0, 8]))
        return bool(torch.allclose(y.detach().float().cpu(), ref.cpu(), atol=1e-1, rtol=1e-2))
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


def pick_impl(device: torch.device, dtype: torch.dtype, impl: str = "auto") -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; choose one of {IMPLS}")
    if impl == "grouped_mm" and not grouped_mm_works(device.type, dtype):
        raise ValueError(f"torch._grouped_mm does not run on {device.type} in {dtype}; use impl='loop'")
    if impl != "auto":
        return impl
    # CPU: measured equal speed (benchmarks/moe_layer.py), keep the public-API loop.
    if device.type == "cpu":
        return "loop"
    return "grouped_mm" if grouped_mm_works(device.type, dtype) else "loop"


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        # our autograd functions call mm with out=, which autocast does not cast: do it here
        dt = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dt), w.to(dt)
    elif x.dtype != w.dtype:
        x = x.to(w.dtype)
    impl = pick_impl(x.device, x.dtype, impl)
    return _grouped(x, w, counts) if impl == "grouped_mm" else _loop(x, w, counts)
