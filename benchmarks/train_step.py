"""Training throughput: moeforge's tiny preset vs the same architecture as HF DeepseekV3ForCausalLM.

Both run full training steps — forward, next-token cross-entropy, backward, gradient
clipping, AdamW step — on the same token batches (windows of the demo's corpus, or random
ids with `--data random`), same config, batch size and
sequence length, measured in the same process in alternating rounds (median). HF's
DeepseekV3 has no MTP head, so moeforge runs twice: without MTP (the same work as HF, plus
the auxiliary-loss-free bias update, which keeps expert loads even as in any moeforge run)
and as the trainer runs it (with the MTP loss and the balance loss as well).
HF runs with its sdpa and its eager attention; ratios are against the faster of the two.
MFU uses accounting.flops_per_token_train against the peak from moeforge.device (on a
CPU: the matmul throughput measured here, since CPUs have no vendor figure).

    .venv/bin/python benchmarks/train_step.py [--batch 8 --seq 256 --threads 2 --dtype float32] [--breakdown]

`--breakdown` then times the step's parts in both models (no-MTP moeforge and HF with its faster
attention) from module hooks: attention, MoE blocks and dense MLPs, forward and backward, and the
rest of the step (embedding, norms, head and loss, clipping, optimizer) as the remainder. CPU ops
run synchronously, so the hooks' clock readings bracket each part's own work.
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

from moeforge.accounting import count_params, flops_per_token_train
from moeforge.config import get_preset
from moeforge.data.prepare import DataConfig, prepare_data
from moeforge.data.sampler import BatchSampler
from moeforge.device import matmul_tflops, tune_host_memory
from moeforge.model.transformer import Transformer
from moeforge.train.balance import moe_modules, update_bias
from moeforge.train.config import TrainConfig
from moeforge.train.optim import build_optimizers
from moeforge.train.trainer import compute_losses


def ours_step(model: Transformer, cfg: TrainConfig, batches, autocast, mtp: bool, compile: bool = False):
    opts = build_optimizers(model, cfg)
    fwd = torch.compile(model) if compile else model  # as `moeforge train --compile`
    moes = moe_modules(model)
    it = iter(batches)

    def step() -> None:
        window = next(it)
        with autocast():  # as the trainer does: the head runs fused with the loss
            out = fwd(window[:, :-1], mtp=mtp, logits=False)
            losses = compute_losses(out, window, cfg, model.lm_head.weight)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        counts = out.expert_counts.float()  # main layers, then MTP layers when it ran
        update_bias(moes[: counts.shape[0]], counts, cfg.bias_update_speed)  # as the trainer does, MTP or not

    return step


def hf_step(hf, cfg: TrainConfig, batches, autocast):
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=True)  # transformers' Trainer default (adamw_torch_fused), and ours on CPU
    it = iter(batches)

    def step() -> None:
        window = next(it)
        with autocast():
            logits = hf(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class PartTimer:
    """Milliseconds per step spent in each decoder part of `layers`, forward and backward, from hooks.

    Attention: forward around the module; backward from the gradient reaching the output projection
    (`o_proj`) to the last input projection's input gradient (`q_a_proj` / `q_proj`, `kv_a_proj_with_mqa`),
    which works for moeforge's MLA and HF's attention alike (HF's eager attention also returns its
    probabilities, so hooks on the whole module would see their gradient only at the end). MLPs: around
    the module, forward and backward (full backward hooks)."""

    def __init__(self, layers) -> None:
        from collections import defaultdict

        self.total: dict[str, float] = defaultdict(float)
        self.handles = []
        for layer in layers:
            attn = layer.self_attn
            self._around("attention fwd", attn)
            inputs = [m for m in (getattr(attn, "q_a_proj", None), getattr(attn, "q_proj", None),
                                  attn.kv_a_proj_with_mqa) if m is not None]
            self._backward_span("attention bwd", attn.o_proj, inputs)
            kind = "MoE" if hasattr(layer.mlp, "gate") else "dense MLP"
            self._around(f"{kind} fwd", layer.mlp)
            self._backward_span(f"{kind} bwd", layer.mlp, [layer.mlp])

    def _around(self, name: str, module) -> None:
        start = {}
        self.handles.append(module.register_forward_pre_hook(lambda m, a: start.__setitem__(0, time.perf_counter())))
        self.handles.append(module.register_forward_hook(
            lambda m, a, o: self._add(name, time.perf_counter() - start[0])))

    def _backward_span(self, name: str, first, lasts) -> None:
        state = {"start": None, "ends": 0}

        def begin(m, g):
            state["start"], state["ends"] = time.perf_counter(), 0

        def end(m, gi, go):
            state["ends"] += 1
            if state["ends"] == len(lasts) and state["start"] is not None:
                self._add(name, time.perf_counter() - state["start"])
                state["start"] = None

        self.handles.append(first.register_full_backward_pre_hook(begin))
        for m in lasts:
            self.handles.append(m.register_full_backward_hook(end))

    def _add(self, name: str, seconds: float) -> None:
        self.total[name] += seconds

    def measure(self, step, repeats: int) -> dict[str, float]:
        """Run `step` `repeats` times; ms per step for each part, and 'step' for the whole."""
        self.total.clear()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        out = {k: v / repeats * 1e3 for k, v in self.total.items()}
        out["step"] = (time.perf_counter() - t0) / repeats * 1e3
        for h in self.handles:
            h.remove()
        return out


def print_breakdown(parts: dict[str, dict[str, float]]) -> None:
    """One column per model, one row per part, the rest of the step as the remainder."""
    names = list(parts)
    rows = sorted({k for p in parts.values() for k in p if k != "step"})
    table = Table(title="where a training step's time goes, ms per step (module hooks)")
    table.add_column("part")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column(f"{names[1]} / {names[0]}", justify="right")
    rest = {n: p["step"] - sum(v for k, v in p.items() if k != "step") for n, p in parts.items()}
    for label, vals in [*((r, {n: parts[n].get(r, 0.0) for n in names}) for r in rows),
                        ("rest: embedding, norms, head + loss, clip, optimizer", rest),
                        ("whole step", {n: parts[n]["step"] for n in names})]:
        a, b = vals[names[0]], vals[names[1]]
        table.add_row(label, *(f"{vals[n]:.1f}" for n in names), f"{b / a:.2f}x" if a else "-")
    Console().print(table)
    print(json.dumps({"bench": "train_step_breakdown", "ms_per_step": {n: {k: round(v, 2) for k, v in p.items()}
                                                                       for n, p in parts.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=30,
                    help="untimed steps per candidate first: compiles, fills oneDNN's kernel cache in bf16, and lets "
                         "the heap reach its high-water mark (the first ~20-30 steps fault fresh pages in: a bf16 "
                         "step spent ~15 ms of ~170 in page faults at step 10, none from step ~30)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--hf-experts", default="grouped_mm", help="HF experts implementation: eager or grouped_mm")
    ap.add_argument("--hf-attention", nargs="+", default=["sdpa", "eager"],
                    help="HF attention implementations to time; ratios are against the fastest")
    ap.add_argument("--data", choices=["stdlib", "random"], default="stdlib",
                    help="token windows from the demo's corpus (expert loads as in real training) or uniform random "
                         "ids (on which the routers of both models send most tokens to a few experts)")
    ap.add_argument("--breakdown", action="store_true",
                    help="then time attention, MoE and dense MLP forward/backward in both models (module hooks)")
    ap.add_argument("--compile", action="store_true",
                    help="also time ours under torch.compile (as `moeforge train --compile`)")
    args = ap.parse_args()
    # as the CLI does (MOEFORGE_KEEP_FREED_MEMORY=0, THP_MEM_ALLOC_ENABLE=0 measure without); all candidates alike
    print(json.dumps({"host_memory": tune_host_memory()}))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    mcfg = get_preset(args.preset)
    tcfg = TrainConfig(batch_size=args.batch, seq_len=args.seq)
    dtype = getattr(torch, args.dtype)

    def autocast():
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    n = args.repeats + args.warmup
    if args.data == "stdlib":  # the demo's corpus and tokenizer (built once, then cached)
        data = prepare_data(DataConfig(vocab_size=mcfg.vocab_size), progress=False)
        sampler = BatchSampler(data.train, args.batch, args.seq, seed=0)
        batches = [sampler.next() for _ in range(3 * n)]
    else:
        batches = [torch.randint(0, mcfg.vocab_size, (args.batch, args.seq + 1)) for _ in range(3 * n)]
    ours = Transformer(mcfg)

    def hf_model(attn: str):
        hf_cfg = DeepseekV3Config(**{k: v for k, v in mcfg.to_hf_dict().items()
                                     if k not in ("architectures", "torch_dtype")})
        hf_cfg._experts_implementation = args.hf_experts
        hf_cfg._attn_implementation = attn
        return DeepseekV3ForCausalLM(hf_cfg)

    hf_params = sum(p.numel() for p in hf_model("sdpa").parameters())
    hf_models = {attn: hf_model(attn) for attn in args.hf_attention}
    steps = {
        "moeforge (no MTP, = HF's work)": ours_step(ours, tcfg, batches, autocast, mtp=False),
        "moeforge (trainer: MTP + balance)": ours_step(Transformer(mcfg), tcfg, batches, autocast, mtp=True),
        **{f"HF DeepseekV3 ({args.hf_experts}, {attn} attention)": hf_step(hf, tcfg, batches, autocast)
           for attn, hf in hf_models.items()},
    }
    if args.compile:
        steps["moeforge compiled (no MTP)"] = ours_step(Transformer(mcfg), tcfg, batches, autocast, mtp=False,
                                                        compile=True)
    with_mtp = {name: name.startswith("moeforge (trainer") for name in steps}  # which FLOP count applies
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    peak = (matmul_tflops("cpu").get(args.dtype) or 0) * 1e12
    flops = {True: flops_per_token_train(mcfg, args.seq, with_mtp=True), False: flops_per_token_train(mcfg, args.seq)}
    table = Table(title=f"training step, {args.preset} ({count_params(mcfg)['total_params'] / 1e6:.1f}M params; "
                        f"HF {hf_params / 1e6:.1f}M), batch {args.batch} x {args.seq}, {args.dtype}, {args.threads} threads")
    for col in ("model", "tokens/s", "MFU", "vs HF"):
        table.add_column(col, justify="right" if col != "model" else "left")
    hf_tps = max(tokens / sorted(t)[len(t) // 2] for k, t in times.items() if k.startswith("HF"))  # HF's best
    for name, t in times.items():
        tps = tokens / sorted(t)[len(t) // 2]
        mfu = tps * flops[with_mtp[name]] / peak if peak else None
        print(json.dumps({"bench": "train_step", "model": name, "tokens_per_s": round(tps, 1),
                          "mfu_vs_measured_matmul_peak": None if mfu is None else round(mfu, 4),
                          "vs_hf": round(tps / hf_tps, 3), "batch": args.batch, "seq": args.seq,
                          "dtype": args.dtype, "threads": args.threads}))
        table.add_row(name, f"{tps:,.0f}", "n/a" if mfu is None else f"{mfu:.1%}", f"{tps / hf_tps:.2f}x")
    Console().print(table)
    print(f"peak used for MFU: {peak / 1e12:.3f} TFLOP/s ({args.dtype} matmul measured on this CPU)")
    if args.breakdown:
        hf_times = {attn: sorted(times[f"HF DeepseekV3 ({args.hf_experts}, {attn} attention)"]) for attn in hf_models}
        best = min(hf_times, key=lambda a: hf_times[a][len(hf_times[a]) // 2])
        parts = {"moeforge": PartTimer(ours.layers).measure(steps["moeforge (no MTP, = HF's work)"], args.repeats),
                 f"HF ({best})": PartTimer(hf_models[best].model.layers).measure(
                     steps[f"HF DeepseekV3 ({args.hf_experts}, {best} attention)"], args.repeats)}
        print_breakdown(parts)


if __name__ == "__main__":
    main()
