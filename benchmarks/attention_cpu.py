"""Causal attention forward + backward on CPU: PyTorch's fused (flash) kernel vs moeforge's explicit GEMMs.

moeforge.ops.attention.attend takes the explicit path for bf16 on CPU when the score matrix has at
most EXPLICIT_SCORES elements; this prints both paths' times for the shapes behind that rule
(the tiny preset's heads and V2/V3-sized heads), in the layout MLA passes them, and their ratio.

    .venv/bin/python benchmarks/attention_cpu.py [--threads 2] [--repeats 15] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from moeforge.device import tune_host_memory
from moeforge.ops.attention import explicit_attention

CASES = [  # heads, qk dim, v dim, batch, tokens
    (4, 48, 32, 16, 128), (4, 48, 32, 8, 256), (4, 48, 32, 4, 512), (4, 48, 32, 2, 1024), (4, 48, 32, 1, 2048),
    (16, 192, 128, 4, 256), (16, 192, 128, 2, 512), (16, 192, 128, 1, 1024),
]


def fused(q, k, v, scale):
    vp = F.pad(v, (0, q.shape[-1] - v.shape[-1]))  # as moeforge does for the flash kernel
    return F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=scale)[..., : v.shape[-1]]


def time_fwd_bwd(fn, H, D, V, B, T, dtype, repeats):
    q, k, v = (torch.randn(B, T, H, d, dtype=dtype).requires_grad_() for d in (D, D, V))
    go = torch.randn(B, H, T, V, dtype=dtype)

    def run():
        q.grad = k.grad = v.grad = None
        fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), D**-0.5).backward(go)

    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args()
    tune_host_memory()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    table = Table(title=f"causal attention fwd+bwd, {args.dtype}, {args.threads} threads (ms)")
    for col in ("heads x (qk, v)", "batch x tokens", "fused", "explicit", "speed-up"):
        table.add_column(col, justify="right")
    for H, D, V, B, T in CASES:
        explicit = lambda q, k, v, s: explicit_attention(q, k, v, s, causal=True)
        a = time_fwd_bwd(fused, H, D, V, B, T, dtype, args.repeats)
        b = time_fwd_bwd(explicit, H, D, V, B, T, dtype, args.repeats)
        print(json.dumps({"bench": "attention_cpu", "heads": H, "qk_dim": D, "v_dim": V, "batch": B, "tokens": T,
                          "dtype": args.dtype, "fused_ms": round(a * 1e3, 2), "explicit_ms": round(b * 1e3, 2),
                          "speedup": round(a / b, 2)}))
        table.add_row(f"{H} x ({D}, {V})", f"{B} x {T}", f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{a / b:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
