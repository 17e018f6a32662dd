"""The DeepSeek-V4 decoder (V4 report section 2; numerics of HF `DeepseekV4ForCausalLM`).

Embedding -> hc_mult copies of the stream -> L blocks -> HyperHead collapse -> RMSNorm
-> head. Each block wraps attention and MoE in manifold-constrained hyper-connections
(moeforge.model.hyper):

    x, post, comb = attn_hc(H);  H = post (x) Attn(input_layernorm(x)) + comb^T H
    x, post, comb = ffn_hc(H);   H = post (x) MoE(post_attention_layernorm(x)) + comb^T H

Attention is sliding / CSA / HCA per `v4.layer_types` (moeforge.model.v4_attention);
every FFN is MoE, hash-routed on `v4.mlp_layer_types == "hash_moe"` layers (experts
from a frozen token-id table) and top-k routed elsewhere, with sqrtsoftplus scores and
the swiglu_limit clamp. Parameter names are HF's in-memory names without `model.`.

MTP: HF's modeling code does not build DeepSeek's MTP layer, so its layout is ours:
module k combines h^{k-1} with the embedding of token i+k as in V3
(eh_proj([enorm(emb); hnorm(h)])), widens it to hc_mult streams, runs one
sliding-window V4 block with top-k MoE, and collapses with its own HyperHead; its `norm`
is applied before the shared head. The interface is the V3 Transformer's
(`forward(...) -> ModelOutput`, `layers[i].mlp`, `mtp[k].block.mlp`, `lm_head`,
`embed_tokens`), so the trainer, checkpoints and CLI use either through
`moeforge.model.build_model`. `absorbed` is accepted and ignored (V4 has no latent).

Shapes: B batch, T tokens, n hc_mult, D hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model.hyper import HyperConnection, HyperHead
from moeforge.model.layers import RMSNorm
from moeforge.model.moe import HashRouter, MoE, MoEStats
from moeforge.model.transformer import ModelOutput, init_parameters, run_mtp
from moeforge.model.v4_attention import COMPILED_TOKENS, V4Attention, V4LayerCache
from moeforge.ops.linear import Linear


class V4Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, hash_routed: bool, impl: str = "auto"):
        super().__init__()
        v, D = cfg.v4, cfg.hidden_size
        self.self_attn = V4Attention(cfg, layer_type)
        self.mlp = MoE(D, cfg.moe, impl, hash_vocab=cfg.vocab_size if hash_routed else None,
                       swiglu_limit=v.swiglu_limit)
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(D, v.hc_mult, v.hc_sinkhorn_iters, v.hc_eps, cfg.rms_norm_eps)
        self.ffn_hc = HyperConnection(D, v.hc_mult, v.hc_sinkhorn_iters, v.hc_eps, cfg.rms_norm_eps)
        self.compiled: tuple | None = None  # (attention_input, ffn) compiled, while V4Transformer.stateless_compiled

    def forward(self, h: torch.Tensor, ids: torch.Tensor, cache: V4LayerCache | None = None
                ) -> tuple[torch.Tensor, V4LayerCache, MoEStats]:
        """h (B, T, n, D) streams -> new streams, this layer's grown cache, MoE statistics."""
        few = self.compiled is not None and h.shape[1] <= COMPILED_TOKENS
        attention_input, ffn = self.compiled if few else (self.attention_input, self.ffn)
        x, post, comb = attention_input(h)
        a, cache = self.self_attn(x, cache)
        h, counts, loss = ffn(h, a, post, comb, ids)
        return h, cache, MoEStats(counts, loss)

    # The block's two parts that hold no cache state: what `V4Transformer.compile_stateless` compiles.
    def attention_input(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streams -> attention input (normalised collapse), post and comb maps."""
        x, post, comb = self.attn_hc(h)
        return self.input_layernorm(x), post, comb

    def ffn(self, h: torch.Tensor, a: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, ids: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge the attention output a into the streams, then the MoE sub-block -> (streams, expert token
        counts, balance loss)."""
        h = HyperConnection.merge(h, a, post, comb)
        x, post, comb = self.ffn_hc(h)
        f, stats = self.mlp(self.post_attention_layernorm(x), ids)
        return HyperConnection.merge(h, f, post, comb), stats.counts, stats.balance_loss


def _ffn_hash(block: V4Block, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block.ffn(*args)


def _ffn_topk(block: V4Block, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block.ffn(*args)


class V4MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__()
        D, v = cfg.hidden_size, cfg.v4
        self.n = v.hc_mult
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, bias=False)
        self.block = V4Block(cfg, "sliding_attention", hash_routed=False, impl=impl)
        self.hc_head = HyperHead(D, v.hc_mult, v.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, emb: torch.Tensor, h_prev: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        h, _, stats = self.step(emb, h_prev, ids)
        return h, stats

    def step(self, emb: torch.Tensor, h_prev: torch.Tensor, ids: torch.Tensor,
             cache: V4LayerCache | list[V4LayerCache | None] | None = None
             ) -> tuple[torch.Tensor, V4LayerCache | list[V4LayerCache], MoEStats]:
        """As `forward`, continuing the block's attention `cache` (or per-row caches, as in
        V4Attention.forward): what speculative decoding drafts with. Returns the grown cache too."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        h, cache, stats = self.block(h.unsqueeze(2).expand(-1, -1, self.n, -1).contiguous(), ids, cache)
        return self.hc_head(h), cache, stats


class V4Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__()
        cfg.validate()
        if cfg.v4 is None:
            raise ValueError("V4Transformer needs a config with a v4 section (e.g. preset tiny-v4)")
        self.cfg = cfg
        v, D = cfg.v4, cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        self.layers = nn.ModuleList(
            V4Block(cfg, t, m == "hash_moe", impl) for t, m in zip(v.layer_types, v.mlp_layer_types, strict=True))
        self.hc_head = HyperHead(D, v.hc_mult, v.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.lm_head = Linear(D, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(V4MTPModule(cfg, impl) for _ in range(cfg.mtp.num_layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) matrices, unit norms and mHC scales, zero biases / sinks / position biases,
        a seeded random hash table."""
        init_parameters(self, self.cfg.initializer_range, zeros=("sinks", "position_bias", "base", "hc_base"),
                        ones=("scale", "hc_scale"))
        for i, m in enumerate(self.modules()):
            if hasattr(m, "init_table") and not m.tid2eid.is_meta:
                m.init_table(seed=i)

    def compile_stateless(self) -> None:
        """torch.compile each block's cache-free parts in place, main and MTP blocks: `V4Block.attention_input` and
        `V4Block.ffn` (the mHC maps, merges, norms and MoE), and the attention's projections (`V4Attention.project`,
        `V4Attention.output`). What runs over the per-row caches, which grow token by token (compressors, indexer,
        attention over window and compressed entries), stays eager, and so does every call on more than
        `COMPILED_TOKENS` tokens per row (prefill, training), as in the V3 engine, whose prefill is eager. The
        compiled parts run only inside `stateless_compiled()`. What the inference engine does for V4 with
        `compile=True`; idempotent, parameters and state-dict names unchanged.
        Blocks of one kind share their compiled graphs (Dynamo inlines the modules and takes their parameters as
        inputs)."""
        # hash-routed and top-k blocks trace to different graphs: each kind gets its own function (Dynamo keeps
        # compiled variants per function, up to a recompile limit that the two kinds' shape variants would share)
        ffn = {True: torch.compile(_ffn_hash), False: torch.compile(_ffn_topk)}
        for block in self._blocks():
            if not hasattr(block, "compiled_parts"):
                kind = isinstance(block.mlp.gate, HashRouter)
                block.compiled_parts = (torch.compile(block.attention_input), partial(ffn[kind], block))
                attn = block.self_attn
                attn.compiled_parts = (torch.compile(attn.project), torch.compile(attn.output))

    @contextlib.contextmanager
    def stateless_compiled(self) -> Iterator[None]:
        """Within this context, blocks run their compiled parts (`compile_stateless`, which must have run) on
        calls of at most COMPILED_TOKENS tokens per row; outside it the model is eager as ever (the engine
        enters it for its steps only, so other users of the same model are unaffected)."""
        modules = [m for b in self._blocks() for m in (b, b.self_attn)]
        for m in modules:
            m.compiled = m.compiled_parts
        try:
            yield
        finally:
            for m in modules:
                m.compiled = None

    def _blocks(self) -> list[V4Block]:
        return [*self.layers, *(m.block for m in self.mtp)]

    def forward(
        self,
        ids: torch.Tensor,
        start_pos: int = 0,
        cache: list[V4LayerCache] | None = None,
        absorbed: bool = False,
        mtp: bool = True,
        return_cache: bool = False,
        logits: bool = True,
    ) -> ModelOutput:
        """Same contract as moeforge.model.transformer.Transformer.forward; `cache` is a list of V4LayerCache.

        For sequences at different positions, `cache[i]` may be a list of B one-row caches (one per
        sequence; `start_pos` is then ignored): attention runs per row over its own cache, everything
        else runs batched, and `out.cache` comes back in the same per-row form.
        """
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor of shape (batch, tokens), got {tuple(ids.shape)} {ids.dtype}")
        if cache is not None and not isinstance(cache[0], list) and cache[0].length != start_pos:
            raise ValueError(f"start_pos={start_pos} does not continue the cache, which holds {cache[0].length} tokens")
        n = self.cfg.v4.hc_mult
        emb = self.embed_tokens(ids)
        h = emb.unsqueeze(2).expand(-1, -1, n, -1).contiguous()
        new_cache: list[V4LayerCache] = []
        stats: list[MoEStats] = []
        for i, layer in enumerate(self.layers):
            h, c, s = layer(h, ids, None if cache is None else cache[i])
            new_cache.append(c)
            stats.append(s)
        h = self.norm(self.hc_head(h))
        out = ModelOutput(logits=self.lm_head(h) if logits else None, hidden=h, moe_stats=stats,
                          cache=new_cache if return_cache else None)
        if mtp and cache is None:
            run_mtp(self, out, ids, h, logits, lambda module, emb, h_prev, n, k: module(emb, h_prev, ids[:, k:]))
        return out
