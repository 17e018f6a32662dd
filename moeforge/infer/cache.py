"""Preallocated latent KV cache for MLA decoding (DeepSeek-V2 report section 2.1.3).

Per layer and per batch slot the cache holds, for each token, only what absorbed MLA
needs: the normalised latent (kv_lora_rank values) and the rotated shared key
(qk_rope_head_dim values). Memory is allocated once, (layers, slots, max_len, C + R),
and never grows by concatenation.

Sequences live in slots 0..n-1 with their own lengths. A forward over a contiguous range
of slots writes T new tokens per row at that row's current length (its positions) and
reads back a view of the first S = max(length) + T cached tokens with a (B, T, S) mask:
query t of row b sees keys 0..length_b + t. Rows shorter than T (padded prefill, rejected
speculative tokens) advance only by their own count in `commit`; what was written past
that is masked out and overwritten later. A finished sequence's slot is refilled by
moving the last slot into it (`move`), so the active rows stay a contiguous prefix and
every step reads plain slices, never a gather.

Shapes: L layers, N slots, M max_len, B rows in a step, T new tokens, S tokens seen,
C kv_lora_rank, R qk_rope_head_dim.
"""

from __future__ import annotations

import torch

from moeforge.model.mla import LatentKV


class LatentCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if slots < 1 or max_len < 1:
            raise ValueError(f"cache needs slots >= 1 and max_len >= 1 (got {slots}, {max_len})")
        self.latent = torch.zeros(num_layers, slots, max_len, kv_lora_rank, device=device, dtype=dtype)  # (L,N,M,C)
        self.k_rope = torch.zeros(num_layers, slots, max_len, rope_dim, device=device, dtype=dtype)  # (L,N,M,R)
        self.lengths = [0] * slots  # tokens held per slot, kept on the host: no device syncs for bookkeeping
        self.max_len = max_len

    @property
    def bytes_per_token(self) -> int:
        """Bytes cached per token over all layers: L * (C + R) * element size."""
        L, _, _, C = self.latent.shape
        return L * (C + self.k_rope.shape[-1]) * self.latent.element_size()

    def step(self, lo: int, hi: int, T: int) -> list[_LayerWriter]:
        """Per-layer cache objects for one forward of T new tokens in slots lo..hi-1 (pass as `cache=`)."""
        lengths = self.lengths[lo:hi]
        S = max(lengths) + T
        if S > self.max_len:
            raise ValueError(f"sequence would reach {S} tokens, the cache holds {self.max_len}")
        dev = self.latent.device
        start = torch.tensor(lengths, device=dev)
        idx = start.view(-1, 1) + torch.arange(T, device=dev)  # (B, T) positions written
        if all(n == lengths[0] for n in lengths):
            mask = None  # equal lengths: the model's own causal mask is exact (and T == 1 needs none)
        else:
            mask = torch.arange(S, device=dev).view(1, 1, S) <= idx.unsqueeze(-1)  # (B, T, S)
        return [_LayerWriter(self, layer, lo, hi, idx, S, mask) for layer in range(self.latent.shape[0])]

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        """(B,) first new position of each row: its current length."""
        return torch.tensor(self.lengths[lo:hi], device=self.latent.device)

    def commit(self, lo: int, counts: list[int]) -> None:
        """Rows lo, lo+1, ... keep `counts[i]` of the tokens just written."""
        for i, n in enumerate(counts):
            self.lengths[lo + i] += n

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's sequence into slot dst (to keep active slots contiguous)."""
        n = self.lengths[src]
        if src != dst:
            self.latent[:, dst, :n] = self.latent[:, src, :n]
            self.k_rope[:, dst, :n] = self.k_rope[:, src, :n]
        self.lengths[dst] = n

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0


class _LayerWriter:
    """One layer's view for one step: `extend` writes the new tokens in place and returns what to attend over."""

    def __init__(self, cache: LatentCache, layer: int, lo: int, hi: int, idx: torch.Tensor, S: int,
                 mask: torch.Tensor | None):
        self.latent = cache.latent[layer, lo:hi]  # (B, M, C) view
        self.k_rope = cache.k_rope[layer, lo:hi]  # (B, M, R) view
        self.idx, self.S, self.mask = idx, S, mask

    def extend(self, latent: torch.Tensor, k_rope: torch.Tensor) -> LatentKV:
        B, T = self.idx.shape
        if T == 1:
            rows = torch.arange(B, device=latent.device)
            self.latent[rows, self.idx[:, 0]] = latent[:, 0].to(self.latent.dtype)
            self.k_rope[rows, self.idx[:, 0]] = k_rope[:, 0].to(self.k_rope.dtype)
        else:
            self.latent.scatter_(1, self.idx.unsqueeze(-1).expand(B, T, self.latent.shape[-1]),
                                 latent.to(self.latent.dtype))
            self.k_rope.scatter_(1, self.idx.unsqueeze(-1).expand(B, T, self.k_rope.shape[-1]),
                                 k_rope.to(self.k_rope.dtype))
        return LatentKV(self.latent[:, : self.S], self.k_rope[:, : self.S], self.mask)
