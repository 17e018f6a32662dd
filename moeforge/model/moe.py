"""Mixture-of-Experts block: router, fused routed experts, shared experts.

DeepSeekMoE (V2 report section 2.2, V3 report section 2.1.2):

* Router: scores s = sigmoid(x W^T) (V3) or softmax (V2) in fp32 (under bf16 autocast too). Group-limited
  selection keeps the best `topk_group` of `n_group` expert groups (V3: group score =
  sum of its top-2 of s + b; V2: max of s), then top-k. The bias b
  (`e_score_correction_bias`, fp32 buffer) affects *selection only*; gate weights come
  from the unbiased s, optionally renormalised, times `routed_scaling_factor`.
* Routed experts: weights fused as (E, ...) tensors; token-expert pairs are sorted by
  expert and each contiguous segment is multiplied once (moeforge.ops.grouped). No
  dense (tokens x experts) masks. `GroupedExperts` takes rows already sorted plus
  per-expert counts: the seam an expert-parallel wrapper replaces.
* Shared experts: one SwiGLU MLP of width n_shared * moe_intermediate_size.
* Inference paths: compiled graphs use the sort-free `_routed_fused`; eager inference on a few
  tokens of a model with few experts per choice runs every expert on every token
  (`_routed_dense`, see `_dense_pays`), where the segment loop would do one tiny product per expert.

DeepSeek-V4 additions (HF `deepseek_v4`), all off by default so V2/V3 numerics are
unchanged: the `sqrtsoftplus` score sqrt(softplus(logit)); hash routing (`HashRouter`:
a frozen token-id -> experts table, a persistent buffer saved with the checkpoint,
chooses the experts; the learned gate only weights them); and `swiglu_limit`, which
clamps the gate pre-activation from above and the up pre-activation to [-limit, limit]
in the routed and shared experts (HF clamps both; the report names the routed ones).

The block also returns what training needs: tokens per expert (for the
auxiliary-loss-free bias update) and the sequence-wise balance loss
sum_i f_i P_i (V3 report eq. 17-20, unweighted; the trainer multiplies by alpha).

Shapes: B batch, T tokens, N = B*T, D hidden, E experts, K top-k, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import MoEConfig
from moeforge.model.layers import MLP
from moeforge.ops import native
from moeforge.ops.grouped import grouped_linear, pick_impl
from moeforge.ops.linear import SMALL_ROWS, linear
from moeforge.ops.permute import combine, dispatch
from moeforge.ops.routed import routed_swiglu
from moeforge.ops.swiglu import swiglu


@dataclass
class Routing:
    indices: torch.Tensor  # (N, K) long: chosen experts
    weights: torch.Tensor  # (N, K) fp32: gate weights
    scores: torch.Tensor  # (N, E) fp32: unbiased affinity scores


class Router(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim, dtype=torch.float32))
        if cfg.has_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits = gate_logits(x, self.weight)  # (N, E) fp32
        scores = _score(logits, cfg.scoring_func)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        return self._weighted(scores, self._select(choice))

    def _select(self, choice: torch.Tensor) -> torch.Tensor:
        """The chosen experts (N, K) of the biased scores choice (N, E): group-limited where configured. On CPU
        the native kernel does it branch-free per row (moeforge.ops.native; torch.topk is slow on short CPU rows:
        benchmarks/moe_layer.py's router forward 4.0 -> 1.3 ms); the same choice, ties to the lower expert, NaN
        as -inf."""
        cfg = self.cfg
        grouped = cfg.topk_method != "greedy" and cfg.n_group > 1
        fill = float("-inf") if cfg.topk_method == "noaux_tc" else 0.0  # V2 zeroes the dropped groups' scores
        cpu32 = choice.device.type == "cpu" and choice.dtype == torch.float32
        lib = native.ops() if cpu32 and not torch.compiler.is_compiling() else None
        if lib is not None:
            return lib.select_experts(choice.detach().contiguous(), cfg.n_group if grouped else 1,
                                      cfg.topk_group if grouped else 1, cfg.num_experts_per_tok,
                                      cfg.topk_method == "noaux_tc", fill)
        if grouped:
            by_group = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_scores = by_group.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = by_group.amax(-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = by_group.masked_fill(~group_mask.unsqueeze(-1), fill).flatten(1)
        return choice.topk(cfg.num_experts_per_tok, dim=-1).indices

    def _weighted(self, scores: torch.Tensor, indices: torch.Tensor) -> Routing:
        """Gate weights of the chosen experts from the unbiased scores: renormalised, scaled."""
        cfg = self.cfg
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * cfg.routed_scaling_factor, scores)


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits x W^T in fp32, under autocast too: the V3 report keeps the gating module in its original
    precision in mixed-precision training, and autocast would otherwise run this product in bf16 (as HF's
    modeling code does under autocast; in fp32 both are the same product)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return linear(x.float(), weight.float())
    return linear(x.float(), weight.float())


def _score(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    return logits.softmax(-1)


class HashRouter(nn.Module):
    """DeepSeek-V4 hash routing: experts = tid2eid[token id] (frozen), weights from the learned gate."""

    def __init__(self, dim: int, cfg: MoEConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim, dtype=torch.float32))
        self.register_buffer("tid2eid", torch.zeros(vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        self.e_score_correction_bias = None  # nothing for the balance update to move

    @torch.no_grad()
    def init_table(self, seed: int = 0) -> None:
        """K distinct experts per token id, drawn uniformly with a fixed seed (a fresh model's table)."""
        g = torch.Generator().manual_seed(seed)
        V, E, K = self.tid2eid.shape[0], self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        self.tid2eid.copy_(torch.rand(V, E, generator=g).argsort(-1)[:, :K].to(self.tid2eid.device))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> Routing:
        cfg = self.cfg
        scores = _score(gate_logits(x, self.weight), cfg.scoring_func)  # (N, E) fp32
        indices = self.tid2eid[ids.reshape(-1)]
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * cfg.routed_scaling_factor, scores)


def clamp_gate_up(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """[gate | up] with gate <= limit and -limit <= up <= limit (DeepSeek-V4 swiglu_limit)."""
    g, u = gu.chunk(2, dim=-1)
    return torch.cat([g.clamp(max=limit), u.clamp(-limit, limit)], dim=-1)


class ClampedMLP(MLP):
    """SwiGLU MLP with the V4 pre-activation clamp (HF applies it to the shared expert too)."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__(dim, inter)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x).clamp(max=self.limit)
        u = self.up_proj(x).clamp(-self.limit, self.limit)
        return self.down_proj(F.silu(g) * u)


class GroupedExperts(nn.Module):
    """E SwiGLU experts in fused tensors, HF layout: gate_up_proj (E, 2I, D), down_proj (E, D, I)."""

    def __init__(self, dim: int, cfg: MoEConfig, impl: str = "auto", limit: float = 0.0):
        super().__init__()
        E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        self.impl, self.limit = impl, limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, dim))
        self.down_proj = nn.Parameter(torch.empty(E, dim, inter))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x: (M, D) rows sorted by expert, counts: (E,) rows per expert, weights: (M,) gate
        weight per row or None -> (M, D) expert outputs, each scaled by its row's weight."""
        gu = grouped_linear(x, self.gate_up_proj, counts, self.impl)
        if self.limit:
            gu = clamp_gate_up(gu, self.limit)
        return grouped_linear(swiglu(gu, weights), self.down_proj, counts, self.impl)

    def routed(self, flat: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor,
               acc: torch.dtype) -> torch.Tensor:
        """Token rows flat (N, D) -> (N, D) in dtype acc: each token's K weighted expert outputs summed.

        tok (M,): the token of each expert-sorted pair; counts (E,): pairs per expert; weights (M,).
        When training where the segment loop runs (CPU): one fused pass per expert (moeforge.ops.routed),
        which keeps far fewer activations for the backward pass. Otherwise, and for subclasses that move
        rows (expert parallelism): dispatch -> forward -> combine, which takes fewer operations per expert
        (eager batch-1 decode of the demo model: 345 tok/s this way, 320 through the fused pass).
        """
        training = torch.is_grad_enabled() and (flat.requires_grad or self.gate_up_proj.requires_grad)
        if training and pick_impl(flat.device, self.gate_up_proj.dtype, self.impl) == "loop":
            return routed_swiglu(flat, self.gate_up_proj, self.down_proj, tok, counts, weights, self.limit, acc)
        return unfused_routed(self, flat, tok, counts, weights, acc)


def unfused_routed(experts: GroupedExperts, flat: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor,
                   weights: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """GroupedExperts.routed through the seam: copy rows into expert order, run the experts, sum back."""
    return combine(experts(dispatch(flat, tok), counts, weights), tok, flat.shape[0], acc)


DENSE_WASTE = 4  # `_dense_pays`: every expert on every token for at most this many times the routed FLOPs ...
DENSE_CACHE_BYTES = 16 * 2**20  # ... when all experts' weights fit in this many bytes (the demo model's: 6 MiB)


@dataclass
class MoEStats:
    counts: torch.Tensor  # (E,) tokens routed to each expert in this call
    balance_loss: torch.Tensor  # scalar fp32, sequence-wise sum_i f_i P_i averaged over sequences


class MoE(nn.Module):
    """hash_vocab: route by a frozen token-id table of that vocabulary (V4 hash layers); swiglu_limit: V4 clamp."""

    def __init__(self, dim: int, cfg: MoEConfig, impl: str = "auto", hash_vocab: int | None = None,
                 swiglu_limit: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.gate: nn.Module = HashRouter(dim, cfg, hash_vocab) if hash_vocab else Router(dim, cfg)
        self.experts = GroupedExperts(dim, cfg, impl, swiglu_limit)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = (
            (ClampedMLP(dim, inter, swiglu_limit) if swiglu_limit else MLP(dim, inter))
            if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, D); ids (B, T) token ids, needed by hash-routed layers only."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        if isinstance(self.gate, HashRouter):
            if ids is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            r = self.gate(flat, ids)
        else:
            r = self.gate(flat)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            out, counts = self._routed_fused(flat, r)  # compiled inference (the engine's decode step)
        elif self._dense_pays(flat.shape[0]):
            out, counts = self._routed_dense(flat, r)  # eager inference on a few tokens of a few-expert model
        else:
            out, counts = self._routed(flat, r)
        out = out.view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        # the balance loss only matters for training; skip its (N, E) work at inference
        loss = self._balance_loss(r, B, T) if self.training else r.scores.new_zeros(())
        return out, MoEStats(counts.detach(), loss)

    @torch.compiler.disable  # per-expert row counts are data-dependent: keep this part eager under compile
    def _routed(self, flat: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed experts for tokens flat (N, D): sort pairs by expert, run each segment, combine."""
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        lib = native.ops() if flat.device.type == "cpu" else None
        if lib is not None:  # a counting sort: the stable argsort's order, 0.83 -> 0.02 ms here
            order, counts = lib.sort_pairs(r.indices.contiguous(), E)
        else:
            expert_of_pair = r.indices.flatten()  # (N*K,)
            order = expert_of_pair.argsort(stable=True)  # pair indices in expert order
            counts = torch.bincount(expert_of_pair, minlength=E)
        tok = order // K  # the token of each sorted row
        # gate weights travel with the rows and scale the expert activations (fp32 router weights)
        acc = torch.promote_types(flat.dtype, torch.float32)  # sum the K weighted outputs in >= fp32
        return self.experts.routed(flat, tok, counts, r.weights.flatten()[order], acc).to(flat.dtype), counts

    def _dense_pays(self, n: int) -> bool:
        """Eager inference on n tokens: run every expert on every token (`_routed_dense`) when n <= SMALL_ROWS,
        there is more than one thread, and either their n*K choices cover about all E experts anyway
        (n*K >= E: the segment loop reads every expert's weights too), or that costs at most DENSE_WASTE
        times the routed FLOPs (E <= 4*n*K) and all experts' weights take at most DENSE_CACHE_BYTES, so
        reading them all stays in cache. Only models with few experts per choice qualify (the tiny presets,
        Mixtral-like 8-choose-2 through the first rule); DeepSeek-V2/V3, Kimi-K2 and V4 never do.
        Demo model, its 3 MoE layers on n rows (us, dense vs segment loop, hot): 2 threads n=4 635 vs 850,
        n=5 1,322 vs 1,203, n=8 1,074 vs 1,019; 1 thread n=4 1,474 vs 900; with MKL on its fast kernels
        (moeforge._mkl) n=1 741 vs 907, n=2 824 vs 1,222. Whole eager decodes of the demo checkpoint, batch 1,
        3 prompts x 128 tokens, median of 4 alternating rounds, once the second rule was added (one token per
        step now takes the dense path): plain 321.7 -> 354.4 tok/s, 3-draft speculation 244.4 -> 264.1 (fast
        MKL); 266.8 -> 302.8 and 209.0 -> 221.8 (MKL's generic path)."""
        cfg = self.cfg
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        if torch.is_grad_enabled() or type(self.experts) is not GroupedExperts or n > SMALL_ROWS:
            return False
        if torch.get_num_threads() < 2:
            return False
        if E <= n * K:
            return True
        ex = self.experts
        weight_bytes = (ex.gate_up_proj.numel() + ex.down_proj.numel()) * ex.gate_up_proj.element_size()
        return E <= DENSE_WASTE * n * K and weight_bytes <= DENSE_CACHE_BYTES

    def _routed_dense(self, flat: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert on every token, weighted by the gate (zero for the experts a token did not choose):
        one product with all experts' gate|up weights stacked, one batched product for the down weights,
        and no sort, host sync or per-expert loop. Each token's output is the same sum as the routed path's
        (the unchosen experts add exact zeros) up to summation order; the K outputs are summed in >= fp32.
        Eager decode of the demo model (16 experts, top-4): a 4-row speculative verify and the MTP
        update take this path, and 3-draft speculation ran 419 -> 459 tok/s (same-process A/B, fp32)."""
        E = self.cfg.n_routed_experts
        ex = self.experts
        N = flat.shape[0]
        I2, D = ex.gate_up_proj.shape[1:]
        gu = linear(flat, ex.gate_up_proj.reshape(E * I2, D)).view(N, E, I2)
        if ex.limit:
            gu = clamp_gate_up(gu, ex.limit)
        g, u = gu.chunk(2, dim=-1)
        w = torch.zeros(N, E, dtype=flat.dtype, device=flat.device).scatter_(1, r.indices, r.weights.to(flat.dtype))
        h = (F.silu(g) * u * w.unsqueeze(-1)).transpose(0, 1)  # (E, N, I)
        acc = torch.promote_types(flat.dtype, torch.float32)
        out = torch.bmm(h, ex.down_proj.transpose(1, 2)).sum(0, dtype=acc).to(flat.dtype)  # (E, N, D) -> (N, D)
        return out, torch.bincount(r.indices.flatten(), minlength=E)

    def _routed_fused(self, flat: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """The same product without sorting or host syncs, for compiled inference on few tokens.

        Each token's K expert matrices are indexed and contracted as a broadcast multiply + sum,
        which Inductor fuses into one reduction kernel reading only the chosen experts' weights
        (eager execution would materialise (N, K, 2I, D): keep this path for compiled graphs).
        """
        E = self.cfg.n_routed_experts
        ex = self.experts
        w = r.weights.to(flat.dtype).unsqueeze(-1)  # (N, K, 1)
        gu = (flat[:, None, None, :] * ex.gate_up_proj[r.indices]).sum(-1)  # (N, K, 2I)
        if ex.limit:
            gu = clamp_gate_up(gu, ex.limit)
        g, u = gu.chunk(2, dim=-1)
        act = F.silu(g) * u * w  # (N, K, I)
        y = (act[:, :, None, :] * ex.down_proj[r.indices]).sum(-1)  # (N, K, D)
        acc = torch.promote_types(flat.dtype, torch.float32)
        idx = r.indices.flatten()
        counts = torch.zeros(E, dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
        return y.sum(1, dtype=acc).to(flat.dtype), counts  # (bincount's output size is data-dependent)

    def _balance_loss(self, r: Routing, B: int, T: int) -> torch.Tensor:
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        chosen = torch.zeros(B * T, E, device=r.scores.device).scatter_(1, r.indices, 1.0).view(B, T, E)
        f = chosen.sum(1) * (E / (K * T))  # (B, E)
        p = (r.scores / r.scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # (B, E)
        return (f * p).sum(-1).mean()
