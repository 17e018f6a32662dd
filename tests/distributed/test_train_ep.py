"""One training step with EP=2 on 2 gloo processes equals the one-process step on the same global batch."""

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_expert_parallel import close, free_port
from torch.distributed.tensor import DTensor

from moeforge.config import get_preset
from moeforge.data import DataConfig
from moeforge.train.config import TrainConfig

pytestmark = pytest.mark.distributed


def small_cfg():
    return get_preset("tiny").replace(vocab_size=512, hidden_size=48, intermediate_size=64, num_layers=3, **{
        "moe.moe_intermediate_size": 16, "moe.n_routed_experts": 8, "moe.n_group": 4, "moe.topk_group": 2,
        "moe.num_experts_per_tok": 2, "attention.q_lora_rank": 24, "attention.kv_lora_rank": 16,
        "attention.qk_nope_head_dim": 8, "attention.qk_rope_head_dim": 4, "attention.v_head_dim": 8})


def make_trainer(corpus: Path, out: Path, batch: int, ep: int):
    from moeforge.train.trainer import Trainer

    tcfg = TrainConfig(steps=3, batch_size=batch, seq_len=32, dtype="float32", ep=ep, samples=0, eval_every=100,
                       ckpt_every=100, threads=1, bias_update_speed=0.01)
    dcfg = DataConfig(paths=[str(corpus)], vocab_size=512, cache_dir=str(out.parent / "cache"), val_fraction=0.2)
    return Trainer(small_cfg(), tcfg, dcfg, out)


def record_grads(trainer, store: dict) -> None:
    """Wrap the optimizers' step to keep full-size gradients of the first step."""
    from moeforge.distributed.expert_parallel import ExpertParallelExperts

    par = trainer.parallel
    experts = {f"{n}.{w}" for n, m in trainer.model.named_modules() if isinstance(m, ExpertParallelExperts)
               for w in ("gate_up_proj", "down_proj")}

    def grab() -> None:
        if store:
            return
        for name, p in trainer.model.named_parameters():
            g = p.grad
            if isinstance(g, DTensor):
                g = g.full_tensor()
            if name in experts:
                parts = [torch.empty_like(g) for _ in range(par.dims.ep)]
                dist.all_gather(parts, g.contiguous(), group=par.ep_group)
                g = torch.cat(parts)
            store[name] = g.detach().clone()

    opt = trainer.optimizers[0]
    step = opt.step
    opt.step = lambda *a, **k: (grab(), step(*a, **k))[1]


def _worker(rank: int, world: int, port: int, corpus: str, out: str, ep: int = 2) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    trainer = make_trainer(Path(corpus), Path(out) / "ep", batch=2, ep=ep)
    grads: dict = {}
    record_grads(trainer, grads)
    result = trainer.train_step()
    biases = [m.gate.e_score_correction_bias.clone() for m in trainer.moes]
    weights = trainer.parallel.full_state_dict(trainer.model)
    torch.save({"result": {k: v for k, v in result.items() if k != "counts"}, "counts": result["counts"],
                "grads": grads, "biases": biases, "weights": weights}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])  # (4, 2): experts also FSDP-sharded over dp_shard=2
def test_one_step_with_ep2_equals_one_process(tmp_path, world, ep):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "dataclasses.py", "csv.py", "difflib.py"):
        (corpus / name).write_text((stdlib / name).read_text())
    mp.spawn(_worker, args=(world, free_port(), str(corpus), str(tmp_path), ep), nprocs=world)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]

    ref = make_trainer(corpus, tmp_path / "single", batch=2 * world, ep=1)
    grads: dict = {}
    record_grads_single = ref.optimizers[0].step

    def grab(*a, **k):
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in ref.model.named_parameters()})
        return record_grads_single(*a, **k)

    ref.optimizers[0].step = grab
    result = ref.train_step()

    for key in ("loss", "main_loss", "mtp_loss", "balance_loss"):
        assert abs(ranks[0]["result"][key] - result[key]) <= 1e-5 * abs(result[key]), key
    assert torch.equal(ranks[0]["counts"], result["counts"])
    assert set(ranks[0]["grads"]) == set(grads)
    for name, g in grads.items():
        for r in ranks:
            close(r["grads"][name], g, name)
    for i, b in enumerate(m.gate.e_score_correction_bias for m in ref.moes):
        for r in ranks:  # identical on every rank, and as in one process
            assert torch.equal(r["biases"][i], b)
    for name, w in ref.model.state_dict().items():
        close(ranks[0]["weights"][name], w, name)


def _run_worker(rank: int, world: int, port: int, corpus: str, out: str, steps: int, resume: bool,
                ep: int = 2, batch: int = 2) -> None:
    from moeforge.train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    tcfg = TrainConfig(steps=steps, batch_size=batch, seq_len=32, dtype="float32", ep=ep, samples=0,
                       eval_every=100, ckpt_every=2, threads=1, warmup_steps=1)
    dcfg = DataConfig(paths=[corpus], vocab_size=512, cache_dir=str(Path(out).parent / "cache"), val_fraction=0.2)
    trainer = Trainer(small_cfg(), tcfg, dcfg, out, resume=resume)
    trainer.run()
    ids = torch.arange(40).view(2, 20) % 500
    with torch.no_grad():
        logits = trainer.model(ids).logits
    weights = trainer.parallel.full_state_dict(trainer.model)  # a collective: every rank takes part
    if rank == 0:
        torch.save({"logits": logits, "weights": weights}, f"{out}/final.pt")
    dist.destroy_process_group()


def small_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "csv.py"):
        (corpus / name).write_text((stdlib / name).read_text())
    return corpus


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run)}


@pytest.mark.parametrize("world", [2, 4])  # 4: dp_shard 2 x ep 2, experts FSDP-sharded too
def test_sharded_checkpoint_resume_and_consolidate(tmp_path, world):
    import moeforge
    from moeforge.distributed.checkpoint import consolidate, is_sharded

    corpus = small_corpus(tmp_path)
    mp.spawn(_run_worker, args=(world, free_port(), str(corpus), str(tmp_path / "a"), 4, False), nprocs=world)
    mp.spawn(_run_worker, args=(world, free_port(), str(corpus), str(tmp_path / "b"), 2, False), nprocs=world)
    mp.spawn(_run_worker, args=(world, free_port(), str(corpus), str(tmp_path / "b"), 4, True), nprocs=world)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # resumed from the sharded step-2 checkpoint
    ckpt = tmp_path / "b" / "checkpoints" / "step_0000004"
    assert is_sharded(ckpt)
    single = consolidate(ckpt, tmp_path / "one")
    model = moeforge.load_model(single, device="cpu")
    final = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    for name, w in model.state_dict().items():
        assert torch.equal(w, final["weights"][name]), name  # the same numbers, bit for bit
    with torch.no_grad():
        close(model(torch.arange(40).view(2, 20) % 500).logits, final["logits"], "logits")


def test_resume_with_another_ep_size(tmp_path):
    """A 2-process run with EP=2 resumed as 2 processes with EP=1 (experts FSDP-sharded instead): DCP
    reshards the expert tensors and optimizer state, and the resumed steps log the uninterrupted run's
    losses (up to the different reduction order)."""
    corpus = small_corpus(tmp_path)
    mp.spawn(_run_worker, args=(2, free_port(), str(corpus), str(tmp_path / "a"), 4, False, 2), nprocs=2)
    mp.spawn(_run_worker, args=(2, free_port(), str(corpus), str(tmp_path / "b"), 2, False, 2), nprocs=2)
    mp.spawn(_run_worker, args=(2, free_port(), str(corpus), str(tmp_path / "b"), 4, True, 1), nprocs=2)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in train_rows(tmp_path / "b")] == [1, 2, 3, 4]  # resumed at step 3: steps 1-2 were not trained (logged) again
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_resume_on_fewer_processes(tmp_path):
    """A 4-process run (EP=2 x FSDP 2, 1 sequence per rank) resumed on 2 processes (EP=2, 2 sequences per
    rank, so the same global batch): DCP reshards parameters and optimizer state onto the new mesh, the
    sampler continues with the same global windows, and the resumed steps log the uninterrupted run's
    losses (up to the different reduction order)."""
    corpus = small_corpus(tmp_path)
    mp.spawn(_run_worker, args=(4, free_port(), str(corpus), str(tmp_path / "a"), 4, False, 2, 1), nprocs=4)
    mp.spawn(_run_worker, args=(4, free_port(), str(corpus), str(tmp_path / "b"), 2, False, 2, 1), nprocs=4)
    mp.spawn(_run_worker, args=(2, free_port(), str(corpus), str(tmp_path / "b"), 4, True, 2, 2), nprocs=2)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in train_rows(tmp_path / "b")] == [1, 2, 3, 4]
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
