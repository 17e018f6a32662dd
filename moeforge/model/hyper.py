"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4 report section 2.2, Xie et al. 2026).

The residual stream is widened to n = hc_mult parallel streams X (B, T, n, D). Around
each sub-block f (attention or MoE) one `HyperConnection` computes, from the flattened
and RMS-normalised streams, three token-dependent maps (one linear layer each, with a
learned bias and a learned scalar scale per map):

    pre  = sigmoid(.) + eps                   (n,)   collapses X into f's input
    post = 2 sigmoid(.)                       (n,)   spreads f's output over the streams
    comb = Sinkhorn(softmax_rows(.) + eps)    (n, n) mixes the streams, doubly stochastic

    X' = post (x) f(sum_j pre_j X_j) + comb^T X

Sinkhorn-Knopp alternately normalises columns and rows (`hc_sinkhorn_iters` column
steps and one fewer row step, in HF's order: column first) so comb is projected onto
the doubly-stochastic matrices and the residual mixing cannot grow the signal.
`HyperHead` collapses the streams once at the end with its own `pre` weights.
Parameter names follow HF (`attn_hc.fn`, `hc_head.hc_fn`, ...). All maps are in fp32.

Shapes: B batch, T tokens, n streams, D hidden.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def _sinkhorn_dims(iters: int) -> list[int]:
    """The summed dimension of each normalisation step, in HF's order: columns, then rows and columns."""
    return [-2] + [-1, -2] * (iters - 1)


def sinkhorn_reference(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn` as plain tensor ops (autograd differentiates the unrolled steps): what it is tested against."""
    for dim in _sinkhorn_dims(iters):
        m = m / (m.sum(dim, keepdim=True) + eps)
    return m


def _axis(dim: int) -> int:
    """The (n, n, N) layout's axis for a step summing over matrix dimension dim: rows (-1) -> 1, columns (-2) -> 0."""
    return 1 if dim == -1 else 0


def _on_numpy(m: torch.Tensor) -> bool:
    """Run the steps in NumPy? fp32/fp64 CPU tensors outside compiled graphs: the same float arithmetic with
    less overhead per operation than PyTorch's eager dispatch, which on these small arrays is all the cost."""
    return m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


def _to_columns(m: torch.Tensor, on_numpy: bool) -> torch.Tensor | np.ndarray:
    """(..., n, n) -> (n, n, N): the matrices side by side along the last, contiguous dimension."""
    n = m.shape[-1]
    if on_numpy:
        return m.detach().numpy().reshape(-1, n, n).transpose(1, 2, 0).copy()
    return m.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _from_columns(x: torch.Tensor | np.ndarray, shape: torch.Size) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).view(shape)
    return x.permute(2, 0, 1).reshape(shape)


def _steps(x, iters: int, eps: float, keep: list | None = None):
    """The normalisation steps on (n, n, N) matrices (a tensor or an array: the same code runs on both);
    `keep` collects each step's (output, denominator) for the backward pass."""
    for dim in _sinkhorn_dims(iters):
        d = x.sum(axis=_axis(dim), keepdims=True)
        d += eps
        x = x / d
        if keep is not None:
            keep.append((x, d))
    return x


class _Sinkhorn(torch.autograd.Function):
    """`sinkhorn_reference`'s steps m_k = m_{k-1} / d_k, d_k = sum(m_{k-1}) + eps, on the matrices stored side
    by side, (n, n, N) with N = all tokens contiguous, so each step's sum adds n contiguous rows of N values
    instead of reducing n values at a stride per matrix: the same n-term sums, and the same values as the plain
    steps (tested). The backward pass is written out: dL/dm_{k-1} = (g - sum(g * m_k)) / d_k for g = dL/dm_k,
    4 ops per step where autograd's graph of the steps takes ~3x as many. fp32 CPU tensors run the steps in
    NumPy (`_on_numpy`). For the tiny V4 preset's (8, 256, 4, 4) comb matrices, forward + backward: 1.3-1.5 ms in
    PyTorch against 9.6-9.9 ms through autograd (2 threads); forward alone for one decode token, 81 us in NumPy,
    178 us in PyTorch."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:  # type: ignore[override]
        on_numpy = _on_numpy(m)
        keep: list = []
        x = _steps(_to_columns(m, on_numpy), iters, eps, keep)
        ctx.iters, ctx.shape = iters, m.shape
        as_tensors = [torch.from_numpy(a) if on_numpy else a for pair in keep for a in pair]  # no copies
        ctx.save_for_backward(*as_tensors)
        return _from_columns(x, m.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        on_numpy = _on_numpy(g)
        saved = [t.numpy() if on_numpy else t for t in ctx.saved_tensors]
        g = _to_columns(g, on_numpy)
        steps = list(zip(saved[::2], saved[1::2], _sinkhorn_dims(ctx.iters), strict=True))
        for out, d, dim in reversed(steps):
            g = g - (g * out).sum(axis=_axis(dim), keepdims=True)
            g /= d
        return _from_columns(g, ctx.shape), None, None


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project positive (..., n, n) matrices towards doubly stochastic ones (HF's step order: column
    normalisation first, `iters` column steps and `iters - 1` row steps, eps added to each sum)."""
    if torch.is_grad_enabled() and m.requires_grad:
        return _Sinkhorn.apply(m, iters, eps)
    on_numpy = _on_numpy(m)
    return _from_columns(_steps(_to_columns(m, on_numpy), iters, eps), m.shape)


class HyperConnection(nn.Module):
    def __init__(self, dim: int, n: int, iters: int, eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = n, iters, eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, n, D) -> (f's input (B, T, D), post (B, T, n), comb (B, T, n, n)); maps in fp32."""
        n = self.n
        mixes = F.linear(unweighted_rms_norm(x.flatten(2).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = torch.softmax((comb_w * s[2] + comb_b).unflatten(-1, (n, n)), dim=-1) + self.eps
        comb = sinkhorn(comb, self.iters, self.eps)
        collapsed = (pre.unsqueeze(-1) * x).sum(2).to(x.dtype)
        return collapsed, post, comb

    @staticmethod
    def merge(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams: post (x) out + comb^T x, i.e. X'_k = post_k out + sum_j comb[j, k] X_j."""
        dtype = x.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x


class HyperHead(nn.Module):
    def __init__(self, dim: int, n: int, eps: float, norm_eps: float):
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * dim, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n, D) -> (B, T, D)."""
        mixes = F.linear(unweighted_rms_norm(x.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * x).sum(2).to(x.dtype)
