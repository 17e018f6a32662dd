"""Linear layers that stay fast for the few rows of a compiled CPU decode step.

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
(training, eager inference, prefill, GPUs) it is `F.linear`. Both give the same values up to
fp32 summation order.

`Linear` is `nn.Linear` with that forward: same parameters, same state-dict names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 4  # see above: at 8 rows whole decode steps measured no faster (fp32) or 10% slower (bf16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias -> (..., N)."""
    if (torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.numel() <= SMALL_ROWS * x.shape[-1]):
        y = (x.unsqueeze(-2) * weight).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
