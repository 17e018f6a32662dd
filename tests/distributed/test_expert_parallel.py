"""Expert parallelism on 2 gloo processes computes what one process computes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeforge.config import MoEConfig
from moeforge.model.moe import MoE

pytestmark = pytest.mark.distributed
D = 24
CFG = MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, moe_intermediate_size=16, n_group=4,
                topk_group=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build() -> tuple[MoE, torch.Tensor]:
    torch.manual_seed(0)
    moe = MoE(D, CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return moe, torch.randn(4, 5, D)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from moeforge.distributed.expert_parallel import apply_expert_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    moe, x = build()
    (ep,) = apply_expert_parallel(moe, dist.group.WORLD)
    x_local = x.chunk(world)[rank].requires_grad_()
    y, stats = moe(x_local)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    for n, g in grads.items():
        if not n.startswith("experts."):  # the routed experts: each rank holds its own slice
            dist.all_reduce(g)  # replicated parameters: sum the data-parallel contributions
    torch.save({"y": y.detach(), "x_grad": x_local.grad, "grads": grads, "first": ep.first, "counts": stats.counts},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


def close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Relative error in norm <= 1e-5 (fp32: segment sizes differ between runs, so do summation orders)."""
    err = float((a - b).norm() / b.norm().clamp_min(1e-12))
    assert err <= 1e-5, f"{what}: relative error {err:.2e}"


def test_expert_parallel_forward_and_backward_equal_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    moe, x = build()
    x = x.requires_grad_()
    y, stats = moe(x)
    y.square().sum().backward()
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    close(torch.cat([p["y"] for p in parts]), y.detach(), "output")
    close(torch.cat([p["x_grad"] for p in parts]), x.grad, "input gradient")
    assert torch.equal(parts[0]["counts"] + parts[1]["counts"], stats.counts)
    for name, p in moe.named_parameters():
        if name.startswith("experts."):
            local = torch.cat([q["grads"][name] for q in parts])  # each rank holds its slice of E
            close(local, p.grad, name)
        else:
            close(parts[0]["grads"][name], p.grad, name)
    assert [q["first"] for q in parts] == [0, 4]
