"""The DeepSeek V2/V3-family decoder: blocks, multi-token prediction, the whole model.

Block (pre-norm): h = h + MLA(norm(h)); h = h + FFN(norm(h)), the FFN dense SwiGLU for
the first `first_k_dense_replace` layers and MoE after.

MTP (V3 report section 2.2): module k (1-based) combines the previous depth's hidden
state h^{k-1}_i with the embedding of token i+k:
    h^k_i = Block_k(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]))
and predicts token i+k+1 through the shared head after its own norm. h^0 is the main
model's output (after the final norm). The embedding and head are shared with the main
model. For input length T, depth k yields logits for positions 0..T-k-1.

Parameter names follow HF / DeepSeek checkpoints (`layers.N.self_attn.kv_b_proj`,
`layers.N.mlp.gate.e_score_correction_bias`, ...) so conversion is mostly renaming.

Shapes: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model.layers import MLP, RMSNorm, RotaryEmbedding
from moeforge.model.mla import MLA, LatentKV
from moeforge.model.moe import MoE, MoEStats
from moeforge.ops.linear import Linear


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None when called with logits=False
    hidden: torch.Tensor  # (B, T, D) after the final norm
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, V), predicts t_{i+k+1}
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T-k, D) after its norm
    moe_stats: list[MoEStats] = field(default_factory=list)  # main MoE layers, then MTP layers
    cache: list[LatentKV] | None = None

    @property
    def expert_counts(self) -> torch.Tensor:
        """(num MoE layers incl. MTP, E) tokens routed to each expert."""
        return torch.stack([s.counts for s in self.moe_stats])

    @property
    def balance_loss(self) -> torch.Tensor:
        """Mean over MoE layers of the sequence-wise balance loss (unweighted)."""
        return torch.stack([s.balance_loss for s in self.moe_stats]).mean()


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, zeros: tuple[str, ...] = (), ones: tuple[str, ...] = ()) -> None:
    """Normal(0, std) matrices, 1 for vectors (norm weights) and leaves named in `ones`, 0 for leaves
    named in `zeros` and for the selection bias buffers. Meta tensors are skipped."""
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in zeros:
            p.zero_()
        elif leaf in ones or p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias") and not b.is_meta:
            b.zero_()


def run_mtp(model: nn.Module, out: ModelOutput, ids: torch.Tensor, h: torch.Tensor, logits: bool,
            step: Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, MoEStats | None]]
            ) -> None:
    """The MTP chain (V3 report section 2.2), shared by the V3 and V4 models: module k reads the previous
    depth's states at positions 0..T-k-1 with the embeddings of tokens k..T-1. `step(module, emb, h_prev,
    n, k)` runs one module over its n positions. Appends to out.mtp_hidden / mtp_logits / moe_stats."""
    T = ids.shape[1]
    h_prev = h
    for k, module in enumerate(model.mtp, start=1):
        n = T - k
        if n <= 0:
            break
        h_prev, s = step(module, model.embed_tokens(ids[:, k:]), h_prev[:, :n], n, k)
        out.mtp_hidden.append(module.norm(h_prev))
        if logits:
            out.mtp_logits.append(model.lm_head(out.mtp_hidden[-1]))
        if s is not None:
            out.moe_stats.append(s)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, impl: str = "auto"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg.hidden_size, cfg.attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg.hidden_size, cfg.moe, impl) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LatentKV | None = None, absorbed: bool = False
    ) -> tuple[torch.Tensor, LatentKV, MoEStats | None]:
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, past, absorbed)
        h = h + a
        f = self.mlp(self.post_attention_layernorm(h))
        stats = None
        if isinstance(f, tuple):
            f, stats = f
        return h + f, kv, stats


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, moe=True, impl=impl)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF/DeepSeek: shared_head.norm

    def forward(
        self, emb: torch.Tensor, h_prev: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, MoEStats | None]:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        h, _, stats = self.block(h, cos, sin)
        return h, stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str = "auto"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i), impl) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, impl) for _ in range(cfg.mtp.num_layers))
        self.rotary = RotaryEmbedding(cfg.attention.qk_rope_head_dim, cfg.attention.rope)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_parameters(self, self.cfg.initializer_range)

    def forward(
        self,
        ids: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: list[LatentKV] | None = None,
        absorbed: bool = False,
        mtp: bool = True,
        return_cache: bool = False,
        logits: bool = True,
    ) -> ModelOutput:
        """ids (B, T) -> logits (B, T, V). With `cache`, ids continue the cached tokens at `start_pos`.

        `start_pos` may be a (B,) tensor: each sequence's first new position (batched sequences of
        different lengths, with a cache whose `extend` supplies the attention mask).

        logits=False skips the output head (main and MTP): the trainer applies it fused with the loss
        to the normalised hidden states (`hidden`, `mtp_hidden`).
        """
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor of shape (batch, tokens), got {tuple(ids.shape)} {ids.dtype}")
        T = ids.shape[1]
        if isinstance(start_pos, torch.Tensor):  # per-sequence positions (B, T)
            positions = start_pos.to(ids.device).view(-1, 1) + torch.arange(T, device=ids.device)
        else:
            positions = torch.arange(start_pos, start_pos + T, device=ids.device)
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(ids)
        new_cache: list[LatentKV] = []
        stats: list[MoEStats] = []
        for i, layer in enumerate(self.layers):
            h, kv, s = layer(h, cos, sin, None if cache is None else cache[i], absorbed)
            if return_cache:
                new_cache.append(kv)
            if s is not None:
                stats.append(s)
        h = self.norm(h)
        out = ModelOutput(logits=self.lm_head(h) if logits else None, hidden=h, moe_stats=stats,
                          cache=new_cache if return_cache else None)
        if mtp and cache is None:
            run_mtp(self, out, ids, h, logits,
                    lambda module, emb, h_prev, n, k: module(emb, h_prev, cos[..., :n, :], sin[..., :n, :]))
        return out
