"""Expert parallelism on CPU processes: step time and all-to-all bytes, 1 vs 2 processes, same global batch.

The tiny preset, random tokens, full training steps (forward, loss, backward, expert-grad
sync, clipping, AdamW, bias update). One process trains on the global batch; two
processes (gloo, EP=2, FSDP2 for everything else) each train on half of it. The
all-to-all payload is counted by the EP wrapper (rows sent to another rank, dispatch and
combine, forward pass; the backward pass sends the same amount again) and compared with

    bytes/token = top_k x hidden x bytes_per_value x 2 directions x (ep - 1) / ep

the expected share of a token's K expert copies that leave its rank under uniform routing.

    .venv/bin/python benchmarks/ep_scaling.py [--steps 6 --batch 8 --seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeforge.config import get_preset
from moeforge.train.balance import moe_modules, update_bias
from moeforge.train.config import TrainConfig
from moeforge.train.optim import build_optimizers
from moeforge.train.trainer import compute_losses


def run(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from moeforge.model import build_model

    torch.set_num_threads(max(1, 2 // world))
    cfg = get_preset("tiny")
    tcfg = TrainConfig()
    par = None
    if world > 1:
        from moeforge.distributed.dims import ParallelDims
        from moeforge.distributed.parallelize import Parallel

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        par = Parallel(ParallelDims(world, ep=world), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg)
    moes = moe_modules(model)
    if par:
        par.apply(model)
    opts = build_optimizers(model, tcfg)
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.steps + 2):
        window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        window = window.chunk(world)[rank]
        t0 = time.perf_counter()
        out_ = model(window[:, :-1])
        compute_losses(out_, window, tcfg)["loss"].backward()
        counts = out_.expert_counts.float()
        params = [p for p in model.parameters() if p.grad is not None]
        if par:
            par.sync_expert_grads()
            par.clip_grad_norm(params, 1.0)
            counts = par.sum_all(counts)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        update_bias(moes, counts, tcfg.bias_update_speed)
        if step >= 2:
            times.append(time.perf_counter() - t0)
        if step == 1 and par:  # count bytes over the timed steps only
            for m in par.expert_modules:
                m.sent_bytes = 0
    sent = sum(m.sent_bytes for m in par.expert_modules) if par else 0
    torch.save({"step_s": sorted(times)[len(times) // 2], "sent_bytes": sent}, f"{out}/{world}_{rank}.pt")
    if par:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    cfg = get_preset("tiny")
    with tempfile.TemporaryDirectory() as out:
        run(0, 1, 0, args, out)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(2, port, args, out), nprocs=2)
        one = torch.load(f"{out}/1_0.pt")
        two = [torch.load(f"{out}/2_{r}.pt") for r in range(2)]
    tokens = args.batch * args.seq
    moe_layers = cfg.num_moe_layers + cfg.mtp.num_layers
    k, d = cfg.moe.num_experts_per_tok, cfg.hidden_size
    # per token and MoE layer; MTP layers see T-1 tokens per sequence
    measured = sum(r["sent_bytes"] for r in two) / args.steps / tokens / moe_layers
    formula = k * d * 4 * 2 * (2 - 1) / 2
    step2 = max(r["step_s"] for r in two)
    rows = [
        {"bench": "ep_scaling", "processes": 1, "step_ms": round(one["step_s"] * 1e3, 1),
         "tokens_per_s": round(tokens / one["step_s"], 1)},
        {"bench": "ep_scaling", "processes": 2, "ep": 2, "step_ms": round(step2 * 1e3, 1),
         "tokens_per_s": round(tokens / step2, 1), "a2a_bytes_per_token_per_moe_layer": round(measured, 1),
         "formula_bytes_per_token_per_moe_layer": formula, "measured_over_formula": round(measured / formula, 3),
         "a2a_bytes_per_step": round(sum(r["sent_bytes"] for r in two) / args.steps)},
    ]
    for r in rows:
        print(json.dumps(r))
    print(f"1 process: {rows[0]['step_ms']} ms/step; 2 processes (EP=2): {rows[1]['step_ms']} ms/step "
          f"({one['step_s'] / step2:.2f}x); all-to-all {measured:,.0f} B/token/MoE layer vs formula {formula:,.0f} "
          f"({measured / formula:.2f}x)")


if __name__ == "__main__":
    main()
