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

import torch
import torch.nn.functional as F
from torch import nn


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project positive (..., n, n) matrices towards doubly stochastic ones (HF's step order)."""
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


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
