"""Scaled dot-product attention for MLA's naive path (training, prefill): fused kernel or explicit GEMMs.

`attend` runs PyTorch's `scaled_dot_product_attention` (the flash kernel on CPU), except where a plain
formulation is faster: on CPU with a causal (or no) mask, bf16 with a score matrix of at most
`EXPLICIT_SCORES` elements, and fp32 for short sequences (below). There the scores come from one batched bf16 GEMM with
the scale and the additive causal mask applied in its epilogue (`baddbmm`), the softmax runs in
PyTorch's bf16 kernel (fp32 inside, bf16 out) and a second GEMM applies it to V; autograd's own
backward of those three ops is the backward pass. On this class of CPU (AVX-512 bf16 dot products)
oneDNN's bf16 GEMMs run at ~4x the fp32 rate, while the CPU flash kernel spends its time in per-block
work. Forward + backward, ms, dev CPU, 2 threads, torch 2.13 (benchmarks/attention_cpu.py):

| heads x (qk, v) dims | batch x tokens | flash | explicit |
|---|---|---:|---:|
| 4 x (48, 32) (tiny preset) | 8 x 256 | 9.7 | 3.0 |
| 4 x (48, 32) | 1 x 2048 | 30.6 | 25.1 |
| 16 x (192, 128) (V2/V3 heads) | 2 x 512 | 91.5 | 29.8 |

What it gives up: the scores are rounded to bf16 before the softmax (the flash kernel keeps them in
fp32), as HF's eager attention does under bf16 autocast; against an fp64 reference the output's
error measured 0.035 against flash's 0.019 at 8 x 256 tokens, the gradients' about the same (0.04-0.06
both). And memory: the backward pass keeps the (B, H, T, S) bf16 probabilities, which is why the
path is bounded to `EXPLICIT_SCORES` elements (32 MiB). Any explicit boolean mask (left-padded batches,
whose fully masked rows the kernels treat in their own way) keeps the fused kernel.

fp32, where the explicit form is exact fp32 arithmetic like the flash kernel: `attention_cpu.py --dtype
float32` (2026-11-30) measured it at 1.31x / 1.09x / 1.04x the flash kernel for the tiny preset's heads at
16 x 128 / 8 x 256 / 4 x 512 tokens and 1.25x for V3-sized heads at 4 x 256 and 2 x 512, but 0.92x at
1 x 1024 and 0.76x / 0.61x at 2 x 1024 / 1 x 2048 (tiny heads). So fp32 takes it up to
`EXPLICIT_FP32_TOKENS` queries and keys and `EXPLICIT_FP32_SCORES` score elements. In the tiny preset's
fp32 training step the flash kernel's backward had made our attention slower than HF's eager attention
(56.5 vs 50.8 ms per step, benchmarks/train_step.py --breakdown).

Shapes: B batch, H heads, T queries, S keys, D query/key dim, V value dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPLICIT_SCORES = 2**24  # score elements B*H*T*S up to which bf16 CPU attention runs as explicit GEMMs
EXPLICIT_FP32_TOKENS = 512  # fp32 CPU attention runs explicitly for at most this many queries and keys ...
EXPLICIT_FP32_SCORES = 2**23  # ... and at most this many score elements (32 MiB of fp32 probabilities)


def explicit_pays(q: torch.Tensor, S: int) -> bool:
    """Take the explicit path for queries q (B, H, T, D) over S keys? On CPU: bf16 with the scores within
    EXPLICIT_SCORES; fp32 for short sequences (EXPLICIT_FP32_TOKENS, EXPLICIT_FP32_SCORES), where it measured
    1.04-1.31x the flash kernel forward + backward and lost from 1K tokens."""
    B, H, T, _ = q.shape
    if q.device.type != "cpu":
        return False
    if q.dtype == torch.bfloat16:
        return B * H * T * S <= EXPLICIT_SCORES
    return (q.dtype == torch.float32 and max(T, S) <= EXPLICIT_FP32_TOKENS
            and B * H * T * S <= EXPLICIT_FP32_SCORES)


def causal_keep(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where query t (at position S - T + t) may see key s: s <= S - T + t."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def causal_bias(T: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, S) additive form of `causal_keep`: 0 where visible, -inf elsewhere."""
    return torch.zeros(T, S, dtype=dtype, device=device).masked_fill_(~causal_keep(T, S, device), float("-inf"))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool) -> torch.Tensor:
    """softmax(scale * q k^T + causal mask) v as two batched GEMMs and a softmax -> (B, H, T, V).

    Any dtype (the tests run it in fp64 against the fused kernel); `attend` uses it for bf16 on CPU.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    qf, kf, vf = q.reshape(B * H, T, D), k.reshape(B * H, S, D), v.reshape(B * H, S, v.shape[-1])
    if causal and T > 1:
        bias = causal_bias(T, S, q.dtype, q.device).expand(B * H, T, S)
        scores = torch.baddbmm(bias, qf, kf.transpose(1, 2), alpha=scale)
    else:  # a single query sees every key
        scores = torch.bmm(qf, kf.transpose(1, 2)).mul_(scale)
    return torch.bmm(scores.softmax(-1), vf).view(B, H, T, -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k (B, H, S, D), v (B, H, S, V) -> (B, H, T, V).

    causal: query t sees keys up to S - T + t (the new tokens follow S - T earlier ones); mask, when
    given, replaces it: a bool (B, 1 or H, T, S) tensor, True where a query may see a key.
    """
    S = k.shape[2]
    if mask is None and explicit_pays(q, S):
        return explicit_attention(q, k, v, scale, causal)
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        # PyTorch's fused (flash) attention wants equal key and value widths; otherwise it falls back
        # to the math path that materialises (T, S) scores: 12 s vs 0.65 s at 16K tokens on the dev
        # CPU. Zero-padding V to the key width and dropping the padding after is exact.
        v = F.pad(v, (0, q.shape[-1] - dv))
    T = q.shape[2]
    if mask is None and causal and T > 1 and T != S:
        mask = causal_keep(T, S, q.device)
    if mask is not None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, scale=scale)
    return o[..., :dv]
