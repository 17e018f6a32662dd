"""DeepSeek-V4 hybrid attention (V4 report section 2.3; numerics of HF `deepseek_v4`).

Every layer is multi-query attention with ONE shared head that is both key and value
(K = V = RMSNorm(W_kv x), partial RoPE on its trailing `qk_rope_head_dim` dims), per-head
queries from a low-rank path (q_a -> RMSNorm -> q_b, then an unweighted per-head RMSNorm),
a learned per-head attention sink in the softmax denominator, and a grouped low-rank
output projection (o_a: one block per head group, then o_b). Because V carries RoPE,
the output's rope dims are rotated back by the query position. The keys a query sees:

* sliding window (every layer): the last `sliding_window` tokens, itself included;
* HCA (`heavily_compressed_attention`): plus ALL compressed entries whose window of
  m' tokens is complete, one entry per window = RMSNorm(sum_j softmax_j(Z_j + B) C_j)
  over the window (`Compressor`, non-overlapping);
* CSA (`compressed_sparse_attention`): entries every m tokens whose softmax pool spans
  2m tokens (series Ca of the previous window, Cb of this one: `overlap=True`), and a
  lightning indexer (`Indexer`: its own small compressor, q from the q latent, score
  sum_h w_h ReLU(q_h . k)) keeps the top `index_topk` complete entries per query.

Compressed entries carry RoPE at their window's first position; CSA/HCA layers use the
"compress" RoPE (`v4.compress_rope`, YaRN in the releases, cos/sin amplitude 1 as HF),
sliding-only layers the main one (`attention.rope`).

One code path serves training, prefill and decode: attention always runs against a
`V4LayerCache` (empty for a fresh sequence) holding only what later tokens need — the
last `sliding_window - 1` K=V vectors, the compressed entries, the indexer keys, and
the compressor state (projected rows of the unfinished window, CSA's previous-window
series). Queries are processed in chunks so the window part costs O(T * window).

Shapes: B batch, T new tokens, H heads, d head_dim, S keys, n compressed entries,
k index_topk, G o_groups, R rotary dims.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from moeforge.config import ModelConfig, RopeConfig
from moeforge.model.hyper import unweighted_rms_norm
from moeforge.model.layers import RMSNorm, rope_inv_freq
from moeforge.ops.linear import Linear

QUERY_CHUNK = 256
COMPILED_TOKENS = 8  # compiled cache-free parts (V4Transformer.compile_stateless) run on at most this many tokens per row


# ------------------------------------------------------------------ rotary (interleaved, trailing dims)
def rope_tables(positions: torch.Tensor, dim: int, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, dim/2) in fp32. HF V4 uses YaRN frequencies with amplitude 1 (no mscale)."""
    inv_freq, _ = rope_inv_freq(dim, rope)
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x (..., T, [heads,] D) as interleaved pairs, in place order.

    cos/sin broadcast against x[..., 0::2] of the rope part, e.g. (T, 1, R/2) for (B, T, H, D).
    """
    r = 2 * cos.shape[-1]
    rf = x[..., -r:].float()
    x1, x2 = rf[..., 0::2], rf[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-r], rot], dim=-1)


# ------------------------------------------------------------------ cache
class _RowStore:
    """A (B, capacity, d) buffer whose first `used` rows are live; cache states view a prefix of it.

    Decoding appends one compressed entry every `rate` tokens. Concatenating would copy all n
    entries each time (quadratic in the context: 256 MB per CSA layer per entry at V4-Flash's 1M
    tokens); appending in place into a buffer of doubling capacity is amortised O(1). A state whose
    prefix is no longer the buffer's end (someone continued from the same state before) copies
    instead, so branching from an old state stays correct.
    """

    def __init__(self, rows: torch.Tensor, capacity: int):
        B, n, d = rows.shape
        self.data = rows.new_empty(B, capacity, d)
        self.data[:, :n] = rows
        self.used = n

    @staticmethod
    def append(entries: torch.Tensor, store: _RowStore | None, rows: torch.Tensor
               ) -> tuple[torch.Tensor, _RowStore | None]:
        """entries (B, n, d) + rows (B, k, d) -> the (B, n + k, d) result and the store it views."""
        if torch.is_grad_enabled():  # training: keep the graph plain
            return torch.cat([entries, rows], 1), None
        n, k = entries.shape[1], rows.shape[1]
        if (store is None or store.used != n or store.data.shape[1] < n + k
                or store.data.shape[0] != rows.shape[0] or store.data.dtype != rows.dtype):
            store = _RowStore(entries, max(16, 2 * (n + k)))
        store.data[:, n : n + k] = rows
        store.used = n + k
        return store.data[:, : n + k], store


@dataclass
class CompressorState:
    pending_kv: torch.Tensor  # (B, p < m, width) projected rows of the unfinished window
    pending_gate: torch.Tensor  # (B, p, width) their fp32 gate logits (position bias not yet added)
    entries: torch.Tensor  # (B, n, d) compressed, normalised, rotated (a view into `store` when decoding)
    overlap_kv: torch.Tensor | None = None  # CSA: (B, m, d) series Ca of the last full window
    overlap_gate: torch.Tensor | None = None  # its gate logits, position bias included
    store: _RowStore | None = None  # decode: the growable buffer behind `entries`


@dataclass
class V4LayerCache:
    """Everything one V4 layer needs to continue a sequence of `length` tokens."""

    length: int
    window: torch.Tensor  # (B, <= sliding_window - 1, d) last K=V vectors
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def nbytes(self) -> int:
        ts = [self.window]
        for s in (self.compressor, self.indexer):
            if s is not None:
                ts += [s.pending_kv, s.pending_gate, s.entries]
                ts += [t for t in (s.overlap_kv, s.overlap_gate) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


# ------------------------------------------------------------------ compressors
class Compressor(nn.Module):
    """Pools every `rate` tokens into one entry of `dim`; `overlap`: CSA's two series over 2 * rate tokens."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, rope: RopeConfig, rope_dim: int, eps: float):
        super().__init__()
        self.dim, self.rate, self.overlap, self.rope, self.rope_dim = dim, rate, overlap, rope, rope_dim
        width = 2 * dim if overlap else dim
        self.kv_proj = Linear(hidden, width, bias=False)
        self.gate_proj = Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width, dtype=torch.float32))
        self.kv_norm = RMSNorm(dim, eps)

    def empty_state(self, x: torch.Tensor) -> CompressorState:
        B, w = x.shape[0], self.kv_proj.out_features
        z = x.new_zeros(B, 0, w)
        return CompressorState(z, z.float(), x.new_zeros(B, 0, self.dim))

    def forward(self, x: torch.Tensor, state: CompressorState) -> CompressorState:
        """Feed new tokens x (B, T, D); returns the new state (entries grown by every completed window)."""
        m, d = self.rate, self.dim
        kv = torch.cat([state.pending_kv, self.kv_proj(x)], 1)
        gate = torch.cat([state.pending_gate, self.gate_proj(x).float()], 1)
        usable = kv.shape[1] // m * m
        new = replace(state, pending_kv=kv[:, usable:], pending_gate=gate[:, usable:])
        if usable == 0:
            return new
        B, nw = kv.shape[0], usable // m
        ckv = kv[:, :usable].view(B, nw, m, -1)
        cg = gate[:, :usable].view(B, nw, m, -1) + self.position_bias.float()
        if self.overlap:
            # slot layout per entry: [Ca of the previous window (m) | Cb of this window (m)]
            prev_kv = ckv.new_zeros(B, nw, m, d)
            prev_g = cg.new_full((B, nw, m, d), float("-inf"))  # no previous window: weight 0
            prev_kv[:, 1:], prev_g[:, 1:] = ckv[:, :-1, :, :d], cg[:, :-1, :, :d]
            if state.overlap_kv is not None:
                prev_kv[:, 0], prev_g[:, 0] = state.overlap_kv, state.overlap_gate
            new.overlap_kv, new.overlap_gate = ckv[:, -1, :, :d], cg[:, -1, :, :d]
            ckv = torch.cat([prev_kv, ckv[..., d:]], 2)
            cg = torch.cat([prev_g, cg[..., d:]], 2)
        pooled = (ckv * cg.softmax(dim=2).to(ckv.dtype)).sum(2)  # (B, nw, d)
        entries = self.kv_norm(pooled)
        first = state.entries.shape[1]
        pos = (torch.arange(first, first + nw, device=x.device)) * m
        cos, sin = rope_tables(pos, self.rope_dim, self.rope)
        new.entries, new.store = _RowStore.append(state.entries, state.store, rope_tail(entries, cos, sin))
        return new


class _Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = Linear(hidden, heads, bias=False)


class Indexer(Compressor):
    """Lightning indexer: its own CSA-style compressor at index_head_dim, plus query heads and head weights."""

    def __init__(self, cfg: ModelConfig):
        v = cfg.v4
        super().__init__(cfg.hidden_size, v.index_head_dim, v.csa_compress_rate, True, v.compress_rope,
                         v.qk_rope_head_dim, cfg.rms_norm_eps)
        self.heads, self.topk = v.index_n_heads, v.index_topk
        self.q_b_proj = Linear(cfg.attention.q_lora_rank, v.index_n_heads * v.index_head_dim, bias=False)
        self.scorer = _Scorer(cfg.hidden_size, v.index_n_heads)

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, k') indices of the chosen complete entries per query, -1 where fewer are ready."""
        B, T, _ = x.shape
        q = rope_tail(self.q_b_proj(q_latent).view(B, T, self.heads, self.dim), cos[:, None], sin[:, None])
        s = torch.einsum("bthd,bnd->bthn", q.float(), keys.float()).relu() * self.dim**-0.5
        w = self.scorer.weights_proj(x).float() * self.heads**-0.5  # (B, T, heads)
        s = (s * w.unsqueeze(-1)).sum(2)  # (B, T, n)
        n = keys.shape[1]
        ready = ((pos + 1) // self.rate)[:, None]  # (T, 1) entries complete at each query
        s = s.masked_fill(torch.arange(n, device=s.device) >= ready, float("-inf"))
        idx = s.topk(min(self.topk, n), dim=-1).indices
        return torch.where(idx >= ready, torch.full_like(idx, -1), idx)


# ------------------------------------------------------------------ attention
class V4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        v, a, D = cfg.v4, cfg.attention, cfg.hidden_size
        self.layer_type, self.window = layer_type, v.sliding_window
        self.h, self.d, self.groups, self.rope_dim = a.num_heads, v.head_dim, v.o_groups, v.qk_rope_head_dim
        self.rope = a.rope if layer_type == "sliding_attention" else v.compress_rope
        self.eps = cfg.rms_norm_eps
        self.q_a_proj = Linear(D, a.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(a.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = Linear(a.q_lora_rank, self.h * self.d, bias=False)
        self.kv_proj = Linear(D, self.d, bias=False)
        self.kv_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.o_a_proj = Linear(self.h * self.d // self.groups, self.groups * v.o_lora_rank, bias=False)
        self.o_b_proj = Linear(self.groups * v.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.empty(self.h, dtype=torch.float32))
        self.compressor: Compressor | None = None
        self.compiled: tuple | None = None  # (project, output) compiled, while V4Transformer.stateless_compiled
        if layer_type == "heavily_compressed_attention":
            self.compressor = Compressor(D, self.d, v.hca_compress_rate, False, v.compress_rope, self.rope_dim,
                                         cfg.rms_norm_eps)
        elif layer_type == "compressed_sparse_attention":
            self.compressor = Compressor(D, self.d, v.csa_compress_rate, True, v.compress_rope, self.rope_dim,
                                         cfg.rms_norm_eps)
            self.compressor.indexer = Indexer(cfg)

    def empty_cache(self, x: torch.Tensor) -> V4LayerCache:
        c = self.compressor
        return V4LayerCache(
            0, x.new_zeros(x.shape[0], 0, self.d),
            None if c is None else c.empty_state(x),
            c.indexer.empty_state(x) if c is not None and hasattr(c, "indexer") else None,
        )

    def forward(self, x: torch.Tensor, cache: V4LayerCache | list[V4LayerCache] | None = None
                ) -> tuple[torch.Tensor, V4LayerCache | list[V4LayerCache]]:
        """x (B, T, D) continuing `cache` (None: a fresh sequence) -> (B, T, D) and the grown cache.

        `cache` may also be a list of B one-row caches of sequences at different positions (the
        inference engine's batched decode): each row then attends over its own cache, and the grown
        caches come back as a list.
        """
        if isinstance(cache, list):
            if len(cache) != x.shape[0]:
                raise ValueError(f"{len(cache)} per-row caches for a batch of {x.shape[0]} rows")
            rows = [self.forward(x[i : i + 1], c) for i, c in enumerate(cache)]
            return torch.cat([o for o, _ in rows]), [c for _, c in rows]
        T = x.shape[1]
        cache = self.empty_cache(x) if cache is None else cache
        start = cache.length
        pos = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_tables(pos, self.rope_dim, self.rope)  # (T, R/2)

        project, output = self.compiled if self.compiled is not None and T <= COMPILED_TOKENS else (
            self.project, self.output)
        q_latent, q, kv = project(x, cos, sin)
        keys = torch.cat([cache.window, kv], 1)  # positions start - P .. start + T - 1
        P = cache.window.shape[1]
        new = V4LayerCache(start + T, keys[:, keys.shape[1] - min(keys.shape[1], self.window - 1):])

        comp, idx = None, None
        if self.compressor is not None:
            new.compressor = self.compressor(x, cache.compressor)
            comp = new.compressor.entries  # (B, n, d)
            if hasattr(self.compressor, "indexer"):
                ind = self.compressor.indexer
                new.indexer = ind(x, cache.indexer)
                idx = ind.select(x, q_latent, new.indexer.entries, pos, cos, sin)  # (B, T, k')

        outs = []
        for i0 in range(0, T, QUERY_CHUNK):
            i1 = min(T, i0 + QUERY_CHUNK)
            outs.append(self._attend(q[:, i0:i1], keys, P, start, i0, i1, comp, None if idx is None else idx[:, i0:i1]))
        return output(torch.cat(outs, 1), cos, sin), new

    # The parts that hold no cache state (what V4Transformer.compile_stateless compiles for decoding).
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> query latent (B, T, q_lora_rank), rotated queries (B, T, H, d), rotated key/value (B, T, d)."""
        B, T, _ = x.shape
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, T, self.h, self.d)
        q = rope_tail(unweighted_rms_norm(q, self.eps), cos[:, None], sin[:, None])
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)
        return q_latent, q, kv

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output o (B, T, H, d) -> (B, T, D) through the grouped low-rank output projection."""
        B, T = o.shape[:2]
        o = rope_tail(o, cos[:, None], -sin[:, None])  # undo the values' rotation at the query position
        g = o.reshape(B, T, self.groups, -1)  # (B, T, G, H*d/G)
        w = self.o_a_proj.weight.view(self.groups, -1, g.shape[-1])  # (G, o_lora_rank, H*d/G)
        return self.o_b_proj(torch.einsum("btgi,gri->btgr", g, w).flatten(2))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, P: int, start: int, i0: int, i1: int,
                comp: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor:
        """Queries i0..i1 (B, c, H, d) over their window keys, their compressed keys and the sinks."""
        B, c = q.shape[:2]
        dev = q.device
        lo = max(0, i0 + P - self.window + 1)
        kw = keys[:, lo : i1 + P]  # (B, Sw, d)
        qpos = torch.arange(start + i0, start + i1, device=dev)[:, None]  # (c, 1)
        kpos = torch.arange(lo, i1 + P, device=dev) + start - P  # (Sw,)
        scale = self.d**-0.5
        s_win = torch.einsum("bchd,bsd->bhcs", q, kw) * scale
        ok = (kpos <= qpos) & (kpos > qpos - self.window)  # (c, Sw)
        s_win = s_win.masked_fill(~ok, float("-inf"))
        parts, vals = [s_win], [kw]
        if comp is not None and comp.shape[1] > 0:
            if idx is None:  # HCA: every complete entry
                ready = (qpos + 1) // self.compressor.rate  # (c, 1)
                s_c = torch.einsum("bchd,bnd->bhcn", q, comp) * scale
                s_c = s_c.masked_fill(torch.arange(comp.shape[1], device=dev) >= ready, float("-inf"))
                parts.append(s_c)
                vals.append(comp)
            elif idx.shape[-1] > 0:  # CSA: the indexer's picks, gathered per query
                sel = comp[torch.arange(B, device=dev)[:, None, None], idx.clamp_min(0)]  # (B, c, k, d)
                s_c = torch.einsum("bchd,bckd->bhck", q, sel) * scale
                s_c = s_c.masked_fill((idx < 0)[:, None], float("-inf"))
                parts.append(s_c)
                vals.append(sel)
        sink = self.sinks.view(1, -1, 1, 1).expand(B, -1, c, 1).to(s_win.dtype)
        logits = torch.cat(parts + [sink], -1)
        probs = (logits.float() - logits.float().amax(-1, keepdim=True)).softmax(-1).to(q.dtype)
        sizes = [p.shape[-1] for p in parts]
        pw, *pc = probs[..., : sum(sizes)].split(sizes, -1)
        out = torch.einsum("bhcs,bsd->bchd", pw, vals[0])
        if pc:
            eq = "bhcn,bnd->bchd" if vals[1].dim() == 3 else "bhck,bckd->bchd"
            out = out + torch.einsum(eq, pc[0], vals[1])
        return out
