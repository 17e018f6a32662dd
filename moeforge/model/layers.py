"""Building blocks shared by every moeforge model: RMSNorm, rotary embedding, SwiGLU MLP.

Rotary embedding uses real cos/sin tables only (no complex tensors, so it runs on
Ascend NPUs), with YaRN frequency scaling (Peng et al. 2023, as used by DeepSeek-V2/V3).

Shapes: B batch, T tokens, H heads, D rotary dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import RopeConfig, yarn_mscale
from moeforge.ops.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the input dtype; the weight is applied after casting back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin amplitude (YaRN attention factor)."""
    base = rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope.type != "yarn":
        return inv_freq, 1.0

    factor = rope.factor

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0 keeps the original (extrapolated) frequency, 1 takes the interpolated one
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if rope.mscale and rope.mscale_all_dim:
        amplitude = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, amplitude


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; (T, D/2) each, fp32.

    The D/2 inverse frequencies are not a buffer, so a model built on the `meta` device needs
    no fix-up: they are computed once per device on first use and kept as a plain attribute
    (recomputing them took ~15 small operations per forward, ~70 us of an eager decode step).
    """

    def __init__(self, dim: int, rope: RopeConfig):
        super().__init__()
        self.dim, self.rope = dim, rope
        self._inv_freq: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._inv_freq.get(positions.device)
        if cached is None:
            inv_freq, amplitude = rope_inv_freq(self.dim, self.rope)
            cached = (inv_freq.to(positions.device), amplitude)
            if not torch.compiler.is_compiling():  # no attribute mutation inside a traced graph
                self._inv_freq[positions.device] = cached
        inv_freq, amplitude = cached
        freqs = positions.float()[..., None] * inv_freq
        if amplitude == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * amplitude, freqs.sin() * amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, D) by angles cos/sin (B or 1, T, D/2).

    interleave=True takes rotary pairs as (x0, x1), (x2, x3), ... (DeepSeek's weight layout);
    False as (x_i, x_{i+D/2}). Both return the rotated pairs in half-split order
    [first elements | second elements]: queries and keys are always rotated alike, so
    their dot products, and hence attention, are the same as with an interleaved output.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    c = cos.unsqueeze(-2).to(x.dtype)  # (B, T, 1, D/2)
    s = sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter, bias=False)
        self.up_proj = Linear(dim, inter, bias=False)
        self.down_proj = Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
