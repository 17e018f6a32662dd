"""Linear layers that stay fast for the few rows of a CPU decode step, compiled or eager.

A decode step multiplies one row per sequence (two when verifying a speculative draft) by
each weight matrix. On CPU, BLAS runs such products as matrix-vector or small-M GEMM kernels
that are slow for their size: the tiny preset's 4096 x 256 output head takes 61 us for one
row and 115 us for two (MKL, 2 threads, eager). Written as a broadcast multiply and a sum
over the input dimension, the same product becomes a reduction that Inductor fuses into its
neighbours and vectorises over the weight rows. Compiled with a symbolic row count, as in
the engine (us per call, dev CPU, torch 2.13, 2 threads, 2026-11-29; a standalone compiled
call carries ~15 us of overhead that a model graph does not):

| rows | 4096 x 256, F.linear | multiply + sum | 768 x 256, F.linear | multiply + sum |
|---:|---:|---:|---:|---:|
| 1 | 84 | 45 | 29 | 21 |
| 2 | 139 | 74 | 44 | 26 |
| 4 | 211 | 109 | 57 | 34 |
| 8 | 219 | 194 | 59 | 43 |
| 16 | 266 | 362 | 78 | 58 |

So `linear` takes that form only where it pays: inside a `torch.compile` graph, without
autograd, on CPU, for at most `SMALL_ROWS` rows; a compiled tiny-preset decode step at batch 1
takes 0.43 ms instead of 0.87 ms (fp32; in bf16 the engine decodes 1,396 instead of 603 tok/s
at batch 1). At 8 rows whole compiled decode steps measured the same either way in fp32 and 10%
slower in bf16 (2,725 vs 3,031 tok/s at batch 8), so the threshold is 4 rows. Everywhere else
(training, prefill, GPUs) it is `F.linear`, except for one eager case below. All forms give the
same values up to fp32 summation order.

Eager fp32 CPU inference on 1-4 rows (a decode step, a speculative verify, a small batch) has the
same problem without a compiler to fuse anything. For 2-4 rows MKL runs x @ W^T at a fraction of its
speed, while the transposed product W @ x^T of the same numbers is split over all threads; for one
row its matrix-vector kernel streams a weight that is not in cache (the usual case in a decode step,
which walks through every layer's weights in turn) at ~12 GB/s, where the same row duplicated into a
two-column product W @ [x, x]^T is threaded. So with more than one thread, no autograd and a weight of
at least `WIDE_WEIGHT` elements (`VECTOR_WEIGHT` for one row), `linear` computes (W @ x^T)^T.
us per call, dev CPU, 2 threads, eager, torch 2.13 (cold: the caches flushed before each call):

| weight | rows | F.linear hot / cold | (W @ x^T)^T hot / cold |
|---|---:|---:|---:|
| 4096 x 256 | 1 | 64 / 331 | 78 / 134 (two columns) |
| 4096 x 256 | 2 | 117 / 419 | 92 / 147 |
| 4096 x 256 | 4 | 171 / 420 | 126 / 159 |
| 4096 x 1024 | 2 / 4 | 932 / 1,303 (hot) | 299 / 381 (hot) |
| 768 x 256 | 2 / 4 | 23 / 35 (hot) | 22 / 27 (hot) |
| 96 x 256 | 2 / 4 | 8.5 / 8.2 (hot) | 9.7 / 10.3 (hot): hence `WIDE_WEIGHT` |
| 768 x 256 | 1 | 12 / 73 | 19 / 60: hence `VECTOR_WEIGHT` |

On one thread it is slower, and in bf16 (oneDNN) it measured 10-30% slower, so neither takes it.
These figures are MKL's generic path, which it runs on AMD CPUs. Where moeforge._mkl has put MKL on its
fast kernels, plain F.linear beats the transposed product (us, hot, 2 threads: 4096 x 256 at 2 rows 25.5
against 88.5, at 4 rows 46.4 against 88.6; 768 x 256 at 2 rows 5.4 against 20.3), and only a single row
against a weight of at least VECTOR_WEIGHT elements still gains from being doubled into a two-row GEMM
(4096 x 256: 57.8 -> 30.6 us; 4096 x 1024: 294 -> 102 us).
Whole decodes of the demo checkpoint (batch 1, greedy, 128 tokens x 3 prompts, median of 6 alternating
rounds in one process): plain 304 -> 324 tok/s, MTP speculation with 3 drafts 379 -> 422 tok/s.

Training and products of more rows in fp32 run on oneDNN where it beats MKL (moeforge.ops.onednn: ~2x
on the dev CPU's AMD EPYC); the few-row decode products above keep their tuned paths.

`Linear` is `nn.Linear` with that forward: same parameters, same state-dict names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeforge import _mkl
from moeforge.ops import onednn

SMALL_ROWS = 4  # see above: at 8 rows whole decode steps measured no faster (fp32) or 10% slower (bf16)
WIDE_WEIGHT = 2**17  # eager transposed product only for weights of at least this many elements (see above)
VECTOR_WEIGHT = 2**20  # ... and for a single row only from this size (see above)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias -> (..., N)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() > SMALL_ROWS * x.shape[-1]:
        if onednn.takes_onednn(x, weight, macs=x.numel() * weight.shape[0]):  # fp32 where oneDNN beats MKL
            return onednn.linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        y = (x.unsqueeze(-2) * weight).sum(-1)
        return y if bias is None else y + bias
    y = few_rows_product(x.reshape(-1, x.shape[-1]), weight)
    if y is None:
        return F.linear(x, weight, bias)
    y = y.contiguous()
    return (y if bias is None else y.add_(bias)).view(*x.shape[:-1], weight.shape[0])


def few_rows_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x (n, K) @ weight (N, K)^T as the threaded transposed product (W @ x^T)^T, a (n, N) view, where
    that beats BLAS's own kernel for so few rows (see above); None where it does not. Inference only:
    the caller checks that autograd is off."""
    n = x.shape[0]
    if (n > SMALL_ROWS or x.device.type != "cpu" or not x.dtype == weight.dtype == torch.float32
            or torch.get_num_threads() < 2 or weight.numel() < (WIDE_WEIGHT if n > 1 else VECTOR_WEIGHT)):
        return None
    if _mkl.STATE == "on":  # MKL on its fast kernels (see below): only a lone row still pays to be doubled
        return F.linear(torch.cat([x, x]), weight)[:1] if n == 1 else None
    if n == 1:
        x = torch.cat([x, x])  # two columns: a threaded GEMM instead of the matrix-vector kernel
    return torch.mm(weight, x.t())[:, :n].t()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
