"""Routed SwiGLU experts in one pass per expert: gather, gate|up, SwiGLU x gate weight, down, scatter-add.

The unfused route (`moeforge.model.moe.unfused_routed`) materialises every token-expert
pair twice: the dispatched inputs (M, D) and the expert outputs (M, D), M = N*K, plus
the activations (M, I) the backward pass needs. Here each expert's segment is gathered
into a small buffer, multiplied, activated, multiplied again and summed into the token
rows while it is still in cache, so only the gate|up pre-activations (M, 2I) are kept
for the backward pass, which recomputes the activation per segment. Same sums in the
same order: the outputs and gradients equal the unfused route's (bit for bit in fp32 where
both take the same kernels; tested); in bf16 the input gradient is summed over each token's K
experts in fp32, as the output is. Where products run on oneDNN (bf16/fp16 on CPU, and fp32
where moeforge.ops.onednn picks it) each segment is multiplied as its row count rounded up to
a multiple of 32 (moeforge.ops.grouped.row_bucket), the extra rows zero in the inputs and the
output gradient, so they add nothing: oneDNN builds a kernel per new shape, and one product
per segment, used in place, beat the earlier split into a multiple of 32 rows plus the
remainder copied into preallocated buffers by 6-12% for the routed part (fp32 and bf16, 16 and
64 experts). What it buys is memory: for benchmarks/moe_layer.py's block (4096
tokens, top-6 of 64 experts of width 256, hidden 512) the activations saved for the
backward pass go from 144 to 56 MiB. In fp32 the speed measured the same (2 cores: the
matmuls run at the CPU's peak either way, and per-segment gathers cost what the two
large copies did); in bf16 the block ran ~5% faster. It is the training path; without
autograd the MoE block takes the unfused route, which runs fewer operations per expert. For fp32
and bf16 on CPU, `routed_swiglu` hands the whole loop to the native kernel (moeforge.ops.native)
where it could be built; `_RoutedSwiGLU` is then the reference it is tested against.

`limit` > 0 applies DeepSeek-V4's clamp (gate <= limit, -limit <= up <= limit) with the
gradient passing where the input lay inside the bounds, as `torch.clamp` does.

Shapes: N tokens, D hidden, E experts, I expert width, M sorted token-expert pairs;
tok (M,) is the token of each sorted pair, counts (E,) the pairs per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeforge.ops import native
from moeforge.ops.grouped import row_bucket
from moeforge.ops.onednn import mm


def _act(gu: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (clamped) gate and up halves of gu (n, 2I)."""
    g, u = gu.chunk(2, dim=-1)
    if limit:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return g, u


def _padded(n: int, step: int) -> int:
    """Rows a segment of n rows is multiplied as: n rounded up to the row bucket (zero rows appended)."""
    return -(-n // step) * step


class _RoutedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, tok, counts, weights, limit, acc):  # type: ignore[override]
        sizes = counts.tolist()
        step = row_bucket(x)
        D = x.shape[1]
        out = torch.zeros(x.shape[0], D, dtype=acc, device=x.device)
        big = _padded(max(sizes, default=0), step)
        xb, wb = x.new_zeros(big, D), x.new_zeros(big, 1)  # rows past a segment stay zero (see below)
        gus = []
        start = 0
        wts = weights.to(x.dtype).unsqueeze(1)  # gate weights in the product dtype, cast once
        for e, n in enumerate(sizes):
            if n:
                # rows n..p of the buffers stay zero: zero inputs, zero weights, zero padding outputs
                p, t = _padded(n, step), tok[start : start + n]
                torch.index_select(x, 0, t, out=xb[:n])
                wb[:n] = wts[start : start + n]
                if p > n:
                    xb[n:p].zero_()
                    wb[n:p].zero_()
                gu = mm(xb[:p], w1[e].t())  # (p, 2I); padding rows: zero input, zero output
                gus.append(gu)
                g, u = _act(gu, limit)
                h = F.silu(g).mul_(u).mul_(wb[:p])
                out.index_add_(0, t, mm(h, w2[e].t())[:n].to(acc))
            start += n
        ctx.sizes, ctx.limit, ctx.acc, ctx.step = sizes, limit, acc, step
        ctx.save_for_backward(x, w1, w2, tok, weights, *gus)
        return out

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        x, w1, w2, tok, weights, *gus = ctx.saved_tensors
        need_x, need_w1, need_w2, _, _, need_wt = ctx.needs_input_grad[:6]
        limit, step = ctx.limit, ctx.step
        gx = torch.zeros(x.shape, dtype=ctx.acc, device=x.device) if need_x else None  # summed over K in acc
        gw1 = torch.empty_like(w1) if need_w1 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        gwt = torch.empty_like(weights) if need_wt else None
        big = _padded(max(ctx.sizes, default=0), step)
        D = x.shape[1]
        xb, gyb, wb = x.new_zeros(big, D), x.new_zeros(big, D), x.new_zeros(big, 1)
        gout = gout.to(x.dtype)
        wts = weights.to(x.dtype).unsqueeze(1)
        start, k = 0, 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                for gw in (gw1, gw2):
                    if gw is not None:
                        gw[e].zero_()  # an expert that saw no token gets a zero gradient
                continue
            p, t, seg = _padded(n, step), tok[start : start + n], slice(start, start + n)
            start += n
            gu = gus[k]
            k += 1
            raw_g, raw_u = gu.chunk(2, dim=-1)
            g, u = _act(gu, limit)
            sg = F.silu(g)
            a = sg * u  # the unweighted activation; padding rows are zero
            wb[:n] = wts[seg]
            torch.index_select(gout, 0, t, out=gyb[:n])
            if p > n:
                wb[n:p].zero_()
                gyb[n:p].zero_()  # zero output gradient on the padding rows: they add nothing below
            w, gy = wb[:p], gyb[:p]
            if gw2 is not None:
                mm(gy.t(), a * w, out=gw2[e])
            if not (need_x or need_w1 or need_wt):
                continue
            gh = mm(gy, w2[e])  # gradient of the weighted activation (p, I)
            if gwt is not None:
                gwt[seg] = torch.linalg.vecdot(gh[:n], a[:n]).to(gwt.dtype)
            gh.mul_(w)
            grad = torch.empty_like(gu)
            grad_g, grad_u = grad.chunk(2, dim=-1)
            torch.mul(gh, sg, out=grad_u)
            torch.ops.aten.silu_backward.grad_input(gh.mul_(u), g, grad_input=grad_g)
            if limit:  # clamp passes the gradient only where the input was inside the bounds
                grad_g.mul_(raw_g <= limit)
                grad_u.mul_((raw_u >= -limit) & (raw_u <= limit))
            if gw1 is not None:
                torch.index_select(x, 0, t, out=xb[:n])
                if p > n:
                    xb[n:p].zero_()
                mm(grad.t(), xb[:p], out=gw1[e])
            if gx is not None:
                gx.index_add_(0, t, mm(grad, w1[e])[:n].to(ctx.acc))
        return None if gx is None else gx.to(x.dtype), gw1, gw2, None, None, gwt, None, None


class _NativeExperts(torch.autograd.Function):
    """The same loop in C++ (moeforge/ops/csrc/moe_cpu.cpp, loaded by moeforge.ops.native)."""

    @staticmethod
    def forward(ctx, x, w1, w2, tok, counts, weights, limit, step):  # type: ignore[override]
        out, gu = native.ops().experts_fwd(x, w1, w2, tok, counts, weights, limit, step)
        ctx.limit, ctx.step = limit, step
        ctx.save_for_backward(x, w1, w2, tok, counts, weights, gu)
        return out

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        x, w1, w2, tok, counts, weights, gu = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = (need[0], need[1], need[2], need[5])
        grads = native.ops().experts_bwd(gout.float().contiguous(), x, w1, w2, tok, counts, weights, gu, ctx.limit,
                                         ctx.step, *wanted)
        gx, gw1, gw2, gwt = (g if n else None for g, n in zip(grads, wanted))
        return gx, gw1, gw2, None, None, gwt, None, None


def takes_native(x: torch.Tensor, w1: torch.Tensor, acc: torch.dtype) -> bool:
    """Run the routed experts with the native kernel? CPU tensors outside compiled graphs, summed in fp32, where it
    could be built: fp32 where the products run on ATen's mm (not oneDNN: moeforge.ops.onednn) outside autocast,
    and bf16 (autocast's dtype on CPUs with bf16 units; products on oneDNN, segments padded to the row bucket as
    in the Python loop)."""
    if x.device.type != "cpu" or x.dtype != w1.dtype or acc != torch.float32 or torch.compiler.is_compiling():
        return False
    if x.dtype == torch.float32:
        ok = not torch.is_autocast_enabled("cpu") and row_bucket(x) == 1
    else:
        ok = x.dtype == torch.bfloat16
    return ok and native.ops() is not None


def routed_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor,
                  weights: torch.Tensor, limit: float = 0.0, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """sum over each token's K experts of weight * down(silu(gate) * up) -> (N, D) in dtype acc.

    x (N, D) token rows; w1 (E, 2I, D) gate|up; w2 (E, D, I) down; tok (M,) and counts (E,)
    as produced by sorting the token-expert pairs by expert; weights (M,) gate weights.
    """
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
    elif x.dtype != w1.dtype:
        x = x.to(w1.dtype)
    if takes_native(x, w1, acc):
        return _NativeExperts.apply(x.contiguous(), w1.contiguous(), w2.contiguous(), tok.contiguous(), counts.cpu(),
                                    weights.float().contiguous(), float(limit), row_bucket(x))
    return _RoutedSwiGLU.apply(x, w1, w2, tok, counts, weights, limit, acc)
