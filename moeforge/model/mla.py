"""Multi-head Latent Attention (DeepSeek-V2 report section 2.1; V3 report section 2.1.1).

Keys and values come from a per-token latent c = RMSNorm(W_dkv x) of `kv_lora_rank`
values plus one rotary key shared by all heads. Two ways to compute the same thing:

* naive (training, prefill): expand the latent through `kv_b_proj` into per-head
  K_nope and V, then ordinary attention;
* absorbed (decode): fold the key half of `kv_b_proj` into the query and the value
  half into the output, so attention runs directly over the cached latent and the
  per-head K/V are never built. Only (latent, rotary key) per token need be cached.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, C kv_lora_rank,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeforge.config import AttentionConfig, yarn_mscale
from moeforge.model.layers import RMSNorm, apply_rope
from moeforge.ops.attention import attend, causal_keep
from moeforge.ops.linear import Linear


@dataclass
class LatentKV:
    """What MLA caches per token: the normalised latent (B, S, C) and rotated key (B, S, R).

    `mask` (B, T, S) bool, when set, says which keys each new query may see; a preallocated
    cache (moeforge.infer.cache) sets it for sequences of different lengths in one batch.
    None means the new tokens directly follow all S - T cached ones (plain causal).
    """

    latent: torch.Tensor
    k_rope: torch.Tensor
    mask: torch.Tensor | None = None

    def extend(self, latent: torch.Tensor, k_rope: torch.Tensor) -> LatentKV:
        return LatentKV(torch.cat([self.latent, latent], 1), torch.cat([self.k_rope, k_rope], 1))


class MLA(nn.Module):
    def __init__(self, hidden: int, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        h, c, r = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(hidden, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in the reference, not rms_norm_eps
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, c + r, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(c)
        self.kv_b_proj = Linear(c, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(h * cfg.v_head_dim, hidden, bias=cfg.attention_bias)
        self.softmax_scale = cfg.qk_head_dim**-0.5
        rope = cfg.rope
        if rope.type == "yarn" and rope.mscale_all_dim:
            self.softmax_scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2

    # ------------------------------------------------------------------ pieces
    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        B, T, _ = x.shape
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, cfg.num_heads, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin, cfg.rope.interleave)  # (B,T,H,N), (B,T,H,R)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cacheable part for tokens x: normalised latent (B,T,C) and rotated shared key (B,T,R)."""
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, self.cfg.rope.interleave).squeeze(2)
        return self.kv_a_layernorm(c), k_rope

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]  # (H,N,C), (H,V,C)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: LatentKV | None = None,
        absorbed: bool = False,
    ) -> tuple[torch.Tensor, LatentKV]:
        """Causal attention of the T new tokens over past + new. Returns (B,T,hidden) and the grown cache.

        The new tokens are assumed to follow the past ones directly (cos/sin hold their positions).
        """
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x, cos, sin)
        c_new, kr_new = self.latent(x, cos, sin)
        kv = LatentKV(c_new, kr_new) if past is None else past.extend(c_new, kr_new)
        if absorbed:
            out = self._attend_absorbed(q_nope, q_rope, kv)
        else:
            out = self._attend_naive(q_nope, q_rope, kv)
        return self.o_proj(out.reshape(B, T, -1)), kv

    def _causal_mask(self, T: int, S: int, device: torch.device) -> torch.Tensor | None:
        if T == 1:
            return None  # one new token sees the whole past
        return causal_keep(T, S, device)

    def _attend_naive(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: LatentKV) -> torch.Tensor:
        cfg = self.cfg
        B, _, H, _ = q_nope.shape
        S = kv.latent.shape[1]
        kvb = self.kv_b_proj(kv.latent).view(B, S, H, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kvb.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, kv.k_rope.unsqueeze(2).expand(B, S, H, cfg.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B,H,*,D)
        mask = None if kv.mask is None else kv.mask.unsqueeze(1)
        return attend(q, k, v, self.softmax_scale, causal=True, mask=mask).transpose(1, 2)  # (B,T,H,V)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: LatentKV) -> torch.Tensor:
        T = q_nope.shape[1]
        S = kv.latent.shape[1]
        w_k, w_v = self._kv_b_weights()
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_k)  # query moved into latent space
        scores = torch.einsum("bthc,bsc->bhts", q_lat, kv.latent) + torch.einsum("bthr,bsr->bhts", q_rope, kv.k_rope)
        # softmax statistics in at least fp32
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.softmax_scale
        mask = kv.mask.unsqueeze(1) if kv.mask is not None else self._causal_mask(T, S, scores.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).to(kv.latent.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", probs, kv.latent)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_v)  # (B,T,H,V)
