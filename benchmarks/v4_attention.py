"""How do V4's hybrid attention layers compare with V3's MLA as the context grows: prefill, decode, cache?

Setting (issue 4): ONE attention layer of each kind at hidden 256, fp32, 2 threads, batch 1,
contexts 1K-16K tokens. Dims are small but keep each design's real proportions:

* V3 MLA (the reference): 4 heads, q_lora_rank 96, kv_lora_rank 128, qk_nope 32, qk_rope 16,
  v_head 32 (V3's 512 / 128 / 64 / 128 scaled by 1/4); cache = latent + rotary key, 144
  values per token.
* V4 (sliding / CSA / HCA): 4 heads, q_lora_rank 96, one K=V head of 128 (16 rotary dims),
  o_groups 2, o_lora_rank 64; the real structure: window 128, CSA compression 4 with the
  lightning indexer (4 index heads of 32 dims: Flash's index_n_heads = num_heads and
  index_head_dim = head_dim / 4), HCA compression 128. index_topk 256 (Flash: 512 over
  up to 1M tokens): it picks every CSA entry at 1K and 1/2 .. 1/16 of them from 2K to 16K,
  so the sparse selection is active over most of the range (`--index-topk` to change it).

Prefill: the layer over `context` tokens from an empty cache (V3: the naive path writing
a preallocated `LatentCache`, as `Engine._prefill`; V4: `V4Attention` with a fresh
`V4LayerCache`). Decode: per new token with the context already cached, over runs of 4
consecutive tokens (one CSA window, so its compression step is included once per run;
HCA's once per 128 tokens is not), restarting from the prefilled cache each run (V3: the
absorbed path over the `LatentCache`, as `Engine._decode`; V4: the layer with its cache,
as the engine's V4 decode). Candidates alternate within each round; medians. Cache bytes per token
from the accounting functions, checked against the cache tensors after prefill.

    .venv/bin/python benchmarks/v4_attention.py [--contexts 1024,2048,4096,8192,16384] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import torch
from _timing import time_round_robin  # benchmarks/_timing.py (the script folder is on sys.path)
from rich.console import Console
from rich.table import Table

from moeforge import accounting, accounting_v4
from moeforge.config import AttentionConfig, ModelConfig, RopeConfig, V4Config
from moeforge.infer.cache import LatentCache
from moeforge.model.layers import RotaryEmbedding
from moeforge.model.mla import MLA
from moeforge.model.v4_attention import V4Attention, V4LayerCache

V4_TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
            "hca": "heavily_compressed_attention"}
RUN = 4  # decode tokens per timed run (one CSA window)
DTYPE_BYTES = 4  # fp32


def configs(hidden: int, heads: int, index_topk: int) -> tuple[ModelConfig, ModelConfig]:
    v3 = ModelConfig(hidden_size=hidden, num_layers=1, attention=AttentionConfig(
        num_heads=heads, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope=RopeConfig(theta=10000.0, interleave=True)))
    v4 = ModelConfig(hidden_size=hidden, num_layers=1,
                     attention=AttentionConfig(num_heads=heads, q_lora_rank=96, rope=RopeConfig(theta=10000.0)),
                     v4=V4Config(layer_types=["sliding_attention"], mlp_layer_types=["moe"], csa_compress_rate=4,
                                 hca_compress_rate=128, sliding_window=128, head_dim=128, qk_rope_head_dim=16,
                                 index_n_heads=heads, index_head_dim=32, index_topk=index_topk, o_groups=2,
                                 o_lora_rank=64, compress_rope=RopeConfig(theta=160000.0)))
    return v3, v4


def one_layer(cfg: ModelConfig, layer_type: str) -> ModelConfig:
    return replace(cfg, v4=replace(cfg.v4, layer_types=[layer_type]))


@torch.no_grad()
def init_(module: torch.nn.Module) -> torch.nn.Module:
    """The model's init: N(0, 0.02) matrices, unit norms, zero sinks and position biases."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("sinks", "position_bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return module.eval()


class V3Runner:
    """One MLA layer over a one-slot preallocated latent cache, driven like the engine drives it."""

    def __init__(self, cfg: ModelConfig, context: int):
        a = cfg.attention
        self.mla = init_(MLA(cfg.hidden_size, a))
        self.rotary = RotaryEmbedding(a.qk_rope_head_dim, a.rope)
        self.cache = LatentCache(1, 1, context + RUN, a.kv_lora_rank, a.qk_rope_head_dim)
        self.context = context

    def _forward(self, x: torch.Tensor, absorbed: bool) -> torch.Tensor:
        T = x.shape[1]
        start = self.cache.lengths[0]
        cos, sin = self.rotary(torch.arange(start, start + T))
        out, _ = self.mla(x, cos, sin, self.cache.step(0, 1, T)[0], absorbed)
        self.cache.commit(0, [T])
        return out

    def prefill(self, x: torch.Tensor) -> None:
        self.cache.clear(0)
        self._forward(x, absorbed=False)

    def decode(self, xs: list[torch.Tensor]) -> None:
        self.cache.lengths[0] = self.context  # restart from the prefilled context
        for x in xs:
            self._forward(x, absorbed=True)

    def cache_bytes(self) -> int:
        n = self.cache.lengths[0]
        return (self.cache.latent[:, :, :n].numel() + self.cache.k_rope[:, :, :n].numel()) * DTYPE_BYTES


class V4Runner:
    def __init__(self, cfg: ModelConfig, layer_type: str):
        self.attn = init_(V4Attention(cfg, layer_type))
        self.cache: V4LayerCache | None = None

    def prefill(self, x: torch.Tensor) -> None:
        _, self.cache = self.attn(x, None)

    def decode(self, xs: list[torch.Tensor]) -> None:
        c = self.cache  # the layer returns a new cache object: the prefilled one is left as it was
        for s in (c.compressor, c.indexer):
            # rewind the growable entry buffers to the prefilled length, so each run appends in place
            # as one continuous decode does (continuing twice from one state would copy: a branch)
            if s is not None and s.store is not None:
                s.store.used = s.entries.shape[1]
        for x in xs:
            _, c = self.attn(x, c)

    def cache_bytes(self) -> int:
        return self.cache.nbytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384", help="comma-separated token counts")
    ap.add_argument("--repeats", type=int, default=5,
                    help="prefill rounds up to 4K (halved above 4K, min 1); decode rounds are 8x this (min 8)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--index-topk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contexts = [int(c) for c in args.contexts.split(",")]
    v3_cfg, v4_cfg = configs(args.hidden, args.heads, args.index_topk)
    names = ["v3_mla"] + list(V4_TYPES)

    # accounting: bytes per cached token, one layer, fp32
    per_token = {"v3_mla": float(accounting.kv_cache_bytes_per_token(v3_cfg, DTYPE_BYTES))}
    by_type = accounting_v4.kv_bytes_per_token_by_type(v4_cfg, DTYPE_BYTES)
    per_token.update({k: by_type[t] for k, t in V4_TYPES.items()})

    prefill: dict[int, dict[str, float]] = {}
    decode: dict[int, dict[str, float]] = {}
    cache_bytes: dict[int, dict[str, int]] = {}
    with torch.inference_mode():
        for ctx in contexts:
            torch.manual_seed(ctx)
            runners = {"v3_mla": V3Runner(v3_cfg, ctx)}
            runners.update({k: V4Runner(one_layer(v4_cfg, t), t) for k, t in V4_TYPES.items()})
            x = torch.randn(1, ctx, args.hidden)
            xs = [torch.randn(1, 1, args.hidden) for _ in range(RUN)]
            big = ctx > 4096
            reps = max(1, args.repeats // 2) if big else args.repeats
            prefill[ctx] = time_round_robin({k: (lambda r=r, x=x: r.prefill(x)) for k, r in runners.items()}, reps,
                                            warmup=0 if big else 1)
            # every runner now holds its prefilled cache of ctx tokens
            cache_bytes[ctx] = {k: r.cache_bytes() for k, r in runners.items()}
            expected = {"v3_mla": int(per_token["v3_mla"] * ctx)}
            expected.update({k: accounting_v4.v4_cache_bytes(one_layer(v4_cfg, t), ctx, DTYPE_BYTES)
                             for k, t in V4_TYPES.items()})
            d = time_round_robin({k: (lambda r=r, xs=xs: r.decode(xs)) for k, r in runners.items()},
                                 max(8, 8 * args.repeats), warmup=2)
            decode[ctx] = {k: s / RUN for k, s in d.items()}
            for k in names:
                print(json.dumps({
                    "bench": "v4_attention", "layer": k, "context": ctx, "prefill_s": round(prefill[ctx][k], 4),
                    "decode_ms_per_token": round(1e3 * decode[ctx][k], 4), "cache_bytes": cache_bytes[ctx][k],
                    "cache_bytes_accounting": expected[k], "cache_matches_accounting": cache_bytes[ctx][k] == expected[k],
                    "prefill_rounds": reps, "threads": args.threads, "dtype": "float32",
                    "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
            del runners, x

    lo, hi = contexts[0], contexts[-1]
    measured_pt = {k: (cache_bytes[hi][k] - cache_bytes[lo][k]) / (hi - lo) if hi > lo else float("nan")
                   for k in names}
    summary = {"bench": "v4_attention", "index_topk": args.index_topk, "loadavg_1m_end": round(os.getloadavg()[0], 2),
               "cache_bytes_per_token_accounting": per_token,
               "cache_bytes_per_token_measured": {k: round(v, 3) for k, v in measured_pt.items()},
               "cache_bytes_per_token_vs_v3": {k: round(per_token[k] / per_token["v3_mla"], 4) for k in names},
               f"decode_growth_{lo}_to_{hi}": {k: round(decode[hi][k] / decode[lo][k], 2) for k in names},
               f"prefill_growth_{lo}_to_{hi}": {k: round(prefill[hi][k] / prefill[lo][k], 2) for k in names}}
    print(json.dumps(summary))

    con = Console()
    for title, data, unit, scale in (("prefill", prefill, "s", 1.0), ("decode per token", decode, "ms", 1e3)):
        t = Table(title=f"One attention layer, {title} ({unit}; V4 / V3 in brackets), fp32, {args.threads} threads")
        t.add_column("context", justify="right")
        for k in names:
            t.add_column(k, justify="right")
        for ctx in contexts:
            row = [f"{data[ctx]['v3_mla'] * scale:.3f}"]
            row += [f"{data[ctx][k] * scale:.3f} ({data[ctx][k] / data[ctx]['v3_mla']:.2f})" for k in V4_TYPES]
            t.add_row(f"{ctx:,}", *row)
        t.add_row(f"{hi // 1024}K / {lo // 1024}K", *[f"{data[hi][k] / data[lo][k]:.2f}x" for k in names])
        con.print(t)
    t = Table(title="Cache bytes (fp32, one layer)")
    t.add_column("layer")
    t.add_column("B/token (accounting)", justify="right")
    t.add_column(f"B/token (measured {lo}->{hi})", justify="right")
    t.add_column("vs V3", justify="right")
    t.add_column(f"total at {hi:,} (tensors)", justify="right")
    t.add_column("= v4_cache_bytes / C*(L+R)", justify="right")
    for k in names:
        t.add_row(k, f"{per_token[k]:g}", f"{measured_pt[k]:g}", f"{per_token[k] / per_token['v3_mla']:.3f}",
                  f"{cache_bytes[hi][k]:,}", "yes" if all(
                      cache_bytes[c][k] == (int(per_token['v3_mla'] * c) if k == 'v3_mla' else
                                            accounting_v4.v4_cache_bytes(one_layer(v4_cfg, V4_TYPES[k]), c, DTYPE_BYTES))
                      for c in contexts) else "NO")
    con.print(t)


if __name__ == "__main__":
    main()
