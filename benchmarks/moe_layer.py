"""How fast is our MoE block, forward + backward, against a dense MLP of the same active width and HF's block?

Setting (issue 2): fp32 (`--dtype bfloat16` for CPUs with bf16 units), 2 threads, hidden 512, 64 routed experts of width 256, top-6,
2 shared experts, 4096 tokens. The dense reference is a SwiGLU MLP of width
6*256 + 2*256 = 2048, i.e. the same matmul FLOPs per token, built from moeforge's Linear (so it
gets the same fp32 GEMM kernel as our block, oneDNN where that is faster); the same MLP from plain
torch.nn.Linear (PyTorch's default GEMM) is timed too, for reference. HF's DeepseekV3MoE runs
with its eager loop and its grouped_mm experts implementation (batched_mm needs a
weight copy per token-expert pair and does not fit in memory); the best one is the reference. Prints one JSON line per measurement
and a table with ratios and the activation memory each keeps for its backward pass. Our block's router
selection, pair sort and routed experts run on moeforge's native CPU kernels where they build
(moeforge.ops.native, printed first); MOEFORGE_NATIVE=0 measures the Python path instead.

    .venv/bin/python benchmarks/moe_layer.py [--tokens 4096] [--threads 2] [--repeats 5] [--profile] [--parts]

`--profile` then runs the dense MLP and our block under torch.profiler and splits each step into its
matrix products (time, FLOPs, rate) and everything else (the five costliest other operations), so the
gap between the two shows where it is: slower products, or work the dense MLP does not have. The
profiler adds a few µs to each of the block's ~2,400 small operations and misplaces time after large
products, so `--parts` times the block's own parts instead, without it: router, routed experts and shared
experts, each forward + backward on the block's routing, in alternating rounds with the whole block and the
dense MLP, and what the routed experts spend beyond their products run at the dense MLP's rate.
"""

from __future__ import annotations

import argparse
import json

import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import torch
from _timing import time_round_robin  # benchmarks/_timing.py (the script folder is on sys.path)
from rich.console import Console
from rich.table import Table

from moeforge.config import MoEConfig
from moeforge.device import tune_host_memory
from moeforge.model.layers import MLP
from moeforge.model.moe import MoE
from moeforge.ops import native
from moeforge.ops.grouped import grouped_mm_works


class TorchMLP(torch.nn.Module):
    """The same SwiGLU MLP from plain torch.nn.Linear: PyTorch's default fp32 GEMM (MKL on x86), where
    moeforge's Linear may take oneDNN (moeforge.ops.onednn). Reported for reference, not the target."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(dim, inter, bias=False)
        self.up_proj = torch.nn.Linear(dim, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def fwd_bwd_step(module: torch.nn.Module, x: torch.Tensor):
    """A closure running forward + backward of the mean square of the output."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x.detach().requires_grad_())
        if isinstance(out, tuple):
            out = out[0]
        out.float().square().mean().backward()

    return step


def saved_activation_mib(module: torch.nn.Module, x: torch.Tensor) -> float:
    """MiB of tensors autograd keeps for the backward pass of one forward, parameters not counted."""
    params = {p.data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_())
    return total / 2**20


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "mkldnn::_linear_pointwise"}


def profile_split(step, steps: int = 3) -> dict:
    """Per step, from torch.profiler: matrix-product time, FLOPs and rate, the rest, its top five ops."""
    from torch.profiler import profile

    step()
    with profile(with_flops=True) as prof:
        for _ in range(steps):
            step()
    gemm_us = flops = other_us = 0.0
    others: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key in GEMM_OPS:
            gemm_us += ev.self_cpu_time_total
            flops += ev.flops or 0
        else:
            other_us += ev.self_cpu_time_total
            others[ev.key] = ev.self_cpu_time_total / steps / 1e3
    top = dict(sorted(others.items(), key=lambda kv: -kv[1])[:5])
    return {"gemm_ms": round(gemm_us / steps / 1e3, 1), "gemm_gflop": round(flops / steps / 1e9, 1),
            "gemm_gflops_per_s": round(flops / gemm_us / 1e3, 1) if gemm_us else None,
            "other_ms": round(other_us / steps / 1e3, 1), "top_other_ms": {k: round(v, 1) for k, v in top.items()}}


def part_steps(block: MoE, x: torch.Tensor) -> dict:
    """Forward + backward closures for the block's router, routed experts and shared experts, on its routing of x."""
    cfg = block.cfg
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        r = block.gate(flat)
    order = r.indices.flatten().argsort(stable=True)
    tok, counts = order // cfg.num_experts_per_tok, torch.bincount(r.indices.flatten(), minlength=cfg.n_routed_experts)
    weights = r.weights.flatten()[order]

    def router() -> None:
        block.zero_grad(set_to_none=True)
        out = block.gate(flat.detach().requires_grad_())
        (out.weights.sum() + out.scores.mean()).backward()

    def routed() -> None:
        block.zero_grad(set_to_none=True)
        y = block.experts.routed(flat.detach().requires_grad_(), tok, counts, weights.clone().requires_grad_(),
                                 torch.float32)
        y.square().mean().backward()

    def shared() -> None:
        block.zero_grad(set_to_none=True)
        block.shared_experts(x.detach().requires_grad_()).float().square().mean().backward()

    return {"router": router, "routed experts": routed, "shared experts": shared}


def hf_block(cfg: MoEConfig, hidden: int, impl: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = DeepseekV3Config(
        hidden_size=hidden, moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
    )
    hf_cfg._experts_implementation = impl
    block = DeepseekV3MoE(hf_cfg)
    block.load_state_dict(state)
    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--expert-width", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="split dense and our block into products and the rest")
    ap.add_argument("--parts", action="store_true", help="time our block's router, routed and shared experts")
    args = ap.parse_args()
    # as the CLI does (MOEFORGE_KEEP_FREED_MEMORY=0, THP_MEM_ALLOC_ENABLE=0 measure without); all candidates alike
    print(json.dumps({"host_memory": tune_host_memory()}))
    torch.set_num_threads(args.threads)
    native.ops()  # built on first use
    print(json.dumps({"native_cpu_kernels": native.STATE}))
    torch.manual_seed(0)

    cfg = MoEConfig(n_routed_experts=args.experts, n_shared_experts=args.shared, num_experts_per_tok=args.top_k,
                    moe_intermediate_size=args.expert_width, n_group=8, topk_group=4, scoring_func="sigmoid",
                    topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(1, args.tokens, args.hidden, dtype=dtype)
    active_width = (args.top_k + args.shared) * args.expert_width
    results: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        tps = args.tokens / seconds
        results[name] = tps
        print(json.dumps({"bench": "moe_layer", "impl": name, "tokens_per_s": round(tps, 1),
                          "seconds": round(seconds, 4), "tokens": args.tokens, "threads": args.threads,
                          "dtype": args.dtype}), flush=True)

    dense = MLP(args.hidden, active_width)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = MoE(args.hidden, cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense.to(dtype)
    ours.to(dtype).gate.float()  # router weights stay fp32, as in the model
    torch_dense = TorchMLP(args.hidden, active_width).to(dtype)
    torch_dense.load_state_dict(dense.state_dict())
    steps = {"dense_mlp": fwd_bwd_step(dense, x), "dense_mlp_torch_linear": fwd_bwd_step(torch_dense, x)}
    modules: dict[str, torch.nn.Module] = {"dense_mlp": dense, "dense_mlp_torch_linear": torch_dense}
    for impl in ("loop", "grouped_mm"):
        if impl == "grouped_mm" and not grouped_mm_works("cpu", torch.float32):
            continue
        block = MoE(args.hidden, cfg, impl=impl).to(dtype)
        block.gate.float()
        block.load_state_dict(ours.state_dict())
        steps[f"moeforge_{impl}"] = fwd_bwd_step(block, x)
        modules[f"moeforge_{impl}"] = block
    if not args.skip_hf:
        # HF's batched_mm gathers a weight matrix per token-expert pair: 24 GiB here in fp32
        # (it fails to allocate) and ~12 GiB in bf16 (the kernel OOM-kills the run), so it is left out.
        for impl in ("eager", "grouped_mm"):
            try:
                hf = hf_block(cfg, args.hidden, impl, ours.state_dict()).to(dtype)
                hf.gate.float()
                step = fwd_bwd_step(hf, x)
                step()
                steps[f"hf_{impl}"] = step
                modules[f"hf_{impl}"] = hf
            except Exception as e:  # noqa: BLE001 - an implementation that does not run here is reported, not fatal
                print(json.dumps({"bench": "moe_layer", "impl": f"hf_{impl}", "error": str(e).splitlines()[0][:160]}))
    for name, seconds in time_round_robin(steps, args.repeats).items():
        record(name, seconds)
    saved = {name: saved_activation_mib(m, x) for name, m in modules.items()}
    print(json.dumps({"bench": "moe_layer", "saved_activations_mib": {k: round(v, 1) for k, v in saved.items()}}))

    ours_best = max(v for k, v in results.items() if k.startswith("moeforge_"))
    hf_best = max((v for k, v in results.items() if k.startswith("hf_")), default=None)
    summary = {"bench": "moe_layer", "ours_vs_dense": round(ours_best / results["dense_mlp"], 3),
               "ours_vs_dense_torch_linear": round(ours_best / results["dense_mlp_torch_linear"], 3)}
    if hf_best:
        summary["ours_vs_hf_best"] = round(ours_best / hf_best, 3)
        summary["hf_best_vs_dense"] = round(hf_best / results["dense_mlp"], 3)
    print(json.dumps(summary))

    table = Table(title=f"MoE block fwd+bwd, {args.dtype}, {args.threads} threads, {args.tokens} tokens")
    table.add_column("implementation")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs dense", justify="right")
    table.add_column("saved for backward", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:,.0f}", f"{v / results['dense_mlp']:.2f}", f"{saved[k]:,.0f} MiB")
    Console().print(table)

    if args.profile:  # after the timed rounds: the profiler's own cost stays out of the figures above
        split = {name: profile_split(steps[name]) for name in ("dense_mlp", "moeforge_loop")}
        print(json.dumps({"bench": "moe_layer", "profile_per_step": split}))
        prof = Table(title="per step under torch.profiler (ms)")
        for col in ("implementation", "products", "GFLOP", "GFLOP/s", "other", "costliest other ops"):
            prof.add_column(col, justify="left" if col in ("implementation", "costliest other ops") else "right")
        for name, d in split.items():
            prof.add_row(name, f"{d['gemm_ms']:.1f}", f"{d['gemm_gflop']:.1f}", f"{d['gemm_gflops_per_s']:.0f}",
                         f"{d['other_ms']:.1f}", ", ".join(f"{k} {v}" for k, v in d["top_other_ms"].items()))
        Console(width=200).print(prof)

    if args.parts:
        block = modules["moeforge_loop"]
        timed = time_round_robin({"whole block": steps["moeforge_loop"], "dense MLP": steps["dense_mlp"],
                                  **part_steps(block, x)}, args.repeats)
        ms = {k: v * 1e3 for k, v in timed.items()}
        # matmul FLOPs of forward + backward: 3 products forward, 6 backward, 2 FLOPs per multiply-add
        dense_flops = 18 * args.tokens * args.hidden * active_width
        routed_flops = 18 * args.tokens * args.top_k * args.hidden * args.expert_width
        at_dense_rate = routed_flops / dense_flops * ms["dense MLP"]
        print(json.dumps({"bench": "moe_layer", "parts_ms": {k: round(v, 1) for k, v in ms.items()},
                          "routed_products_at_dense_rate_ms": round(at_dense_rate, 1),
                          "routed_other_ms": round(ms["routed experts"] - at_dense_rate, 1)}))
        parts = Table(title=f"our block's parts, forward + backward, ms (median of {args.repeats} alternating rounds)")
        parts.add_column("part")
        parts.add_column("ms", justify="right")
        for k, v in ms.items():
            parts.add_row(k, f"{v:.1f}")
        parts.add_row("routed products at the dense MLP's rate", f"{at_dense_rate:.1f}")
        parts.add_row("routed experts' other work", f"{ms['routed experts'] - at_dense_rate:.1f}")
        Console().print(parts)


if __name__ == "__main__":
    main()
