"""The training loop: corpus -> tokenizer -> token shards -> a trained MoE model, resumable and observable.

One optimizer step = `grad_accum` micro-batches of random windows. The loss is

    L = L_main + (lambda / D) * sum_k L_mtp_k + alpha * sum_layers L_balance

(V3 report eq. 25 for MTP, eq. 17-20 for the sequence-wise balance loss), computed in
fp32. After each optimizer step the selection bias of every MoE layer, MTP layers
included, moves by gamma * sign(mean load - load) from that step's token counts.

Non-finite losses skip the step with a warning; `max_bad_steps` in a row abort the run
without touching the last good checkpoint. A resumed run restores model, optimizer,
sampler and step exactly: in fp32 on a CPU it reproduces the uninterrupted run's
losses bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console

from moeforge.accounting import flops_per_token_train
from moeforge.config import ModelConfig
from moeforge.device import default_device, default_dtype, matmul_tflops, peak_flops
from moeforge.distributed.dims import launched_by_torchrun
from moeforge.model import build_model
from moeforge.model.transformer import ModelOutput
from moeforge.ops.cross_entropy import linear_cross_entropy
from moeforge.train.balance import load_stats, moe_modules, update_bias
from moeforge.train.config import TrainConfig
from moeforge.train.optim import build_optimizers, lr_multiplier, set_lr
from moeforge.train.plots import METRICS
from moeforge.train.state import CKPT_DIR, check_resume_layout, checkpoints, resume_latest, save_checkpoint

RUN_CONFIG = "run_config.json"


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite losses."""


def compute_losses(out: ModelOutput, window: torch.Tensor, cfg: TrainConfig,
                   head: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """window (B, T+1): inputs are window[:, :T]; depth-k MTP outputs predict window[:, k+1:].

    With `head` (the output weight) and an output computed with logits=False, the head
    runs fused with the loss (moeforge.ops.cross_entropy) on the hidden states.
    """

    def ce(logits: torch.Tensor | None, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits is not None:
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return linear_cross_entropy(hidden.flatten(0, 1), head, targets.flatten())

    main = ce(out.logits, out.hidden, window[:, 1:])
    losses = {"main_loss": main}
    total = main
    depths = len(out.mtp_logits) or len(out.mtp_hidden)
    if depths:
        mtp = [ce(out.mtp_logits[k - 1] if out.mtp_logits else None, out.mtp_hidden[k - 1], window[:, k + 1 :])
               for k in range(1, depths + 1)]
        losses["mtp_loss"] = torch.stack(mtp).mean()
        total = total + cfg.mtp_weight * losses["mtp_loss"]
    if out.moe_stats:
        losses["balance_loss"] = torch.stack([s.balance_loss for s in out.moe_stats]).sum()
        total = total + cfg.balance_alpha * losses["balance_loss"]
    losses["loss"] = total
    return losses


class Trainer:
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: Any, out_dir: str | Path,
                 resume: bool = False, console: Console | None = None):
        from moeforge.data import prepare_data  # the data pipeline pulls in tokenizers / numpy

        self.tcfg = train_cfg.validate()
        self.dcfg = data_cfg
        self.out = Path(out_dir)
        self.console = console or Console()
        if self.tcfg.threads:
            torch.set_num_threads(self.tcfg.threads)
        self.device = torch.device(self.tcfg.device) if self.tcfg.device else default_device()
        self.dtype = default_dtype(self.device) if self.tcfg.dtype == "auto" else getattr(torch, self.tcfg.dtype)

        self.parallel = None
        if launched_by_torchrun() or self.tcfg.ep > 1:
            if not launched_by_torchrun():
                raise ValueError(f"--ep {self.tcfg.ep} needs several processes: launch with torchrun or --nproc N")
            from moeforge.distributed.dims import ParallelDims, init
            from moeforge.distributed.parallelize import Parallel

            dims, _, _ = init(self.device, self.tcfg.ep)
            self.parallel = Parallel(ParallelDims(dims.world, self.tcfg.ep), self.device)
            if not self.parallel.is_main:
                self.console = Console(quiet=True)
        self.is_main = self.parallel is None or self.parallel.is_main
        if self.out.exists() and checkpoints(self.out) and not resume:
            raise ValueError(f"run folder {self.out} already has checkpoints; pass --resume to continue it "
                             "or choose another --out")
        if self.tcfg.seq_len > model_cfg.max_position_embeddings:
            raise ValueError(f"seq_len {self.tcfg.seq_len} is above the model's maximum of "
                             f"{model_cfg.max_position_embeddings} positions; lower --seq-len")
        if self.parallel is not None and not self.is_main:
            dist.barrier()  # rank 0 builds the token cache first; the others then read it
        self.data = prepare_data(data_cfg, progress=self.is_main)
        if self.parallel is not None and self.is_main:
            dist.barrier()
        vocab = self.data.tokenizer.get_vocab_size()
        if model_cfg.vocab_size < vocab:
            raise ValueError(f"the model's vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's "
                             f"{vocab} tokens; raise the model vocab size or train a smaller tokenizer")
        # the end-of-text token separates documents: it is the model's eos, and there is no bos
        self.mcfg = model_cfg.replace(eos_token_id=self.data.eot_id, bos_token_id=None)
        self.has_val = len(self.data.val) > self.tcfg.seq_len
        if not self.has_val:
            warnings.warn(f"the validation split holds {len(self.data.val)} tokens, fewer than one window of "
                          f"{self.tcfg.seq_len + 1}: no validation loss will be reported", stacklevel=2)

        from moeforge.data import BatchSampler

        torch.manual_seed(self.tcfg.seed)
        self.model = build_model(self.mcfg).to(self.device)  # same seed: identical on every rank
        self.moes = moe_modules(self.model)
        if self.parallel is not None and self.tcfg.ep > 1:
            self.parallel.apply_ep(self.model)
        if self.tcfg.activation_checkpointing:
            from moeforge.distributed.parallelize import apply_activation_checkpointing

            apply_activation_checkpointing(self.model)
        if self.parallel is not None:
            self.parallel.apply(self.model)
        self.forward = torch.compile(self.model) if self.tcfg.compile else self.model
        self.optimizers = build_optimizers(self.model, self.tcfg)
        # every rank draws the same global batch and trains on its slice: a W-process run sees exactly
        # the batches of a one-process run with W times the batch size
        self.world = 1 if self.parallel is None else self.parallel.dims.world
        self.sampler = BatchSampler(self.data.train, self.tcfg.batch_size * self.world, self.tcfg.seq_len,
                                    self.tcfg.seed)
        self.step = 0
        self.total_steps = self.tcfg.steps
        self.tokens_seen = 0
        self.bad_steps = 0
        self.resumed_from: str | None = None
        if resume:
            check_resume_layout(self.out, multi_process=self.parallel is not None)
        if resume and self.parallel is not None:
            from moeforge.distributed.checkpoint import is_sharded, load_sharded

            found = [p for p in checkpoints(self.out) if is_sharded(p)]
            if found:
                state = load_sharded(found[0], self.model, self.optimizers, self.parallel)
                self._restore({**state, "checkpoint": str(found[0])})
        elif resume:
            state = resume_latest(self.out, self.model, self.optimizers)
            if state is not None:
                self._restore(state)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_run_config()

        self.flops_per_token = flops_per_token_train(self.mcfg, self.tcfg.seq_len, with_mtp=True)
        peak = peak_flops(self.device, self.dtype)
        self.peak_label = "vendor peak"
        if peak is None:  # CPUs: no vendor figure; use the matmul throughput measured here
            measured = matmul_tflops(str(self.device)).get(str(self.dtype).removeprefix("torch."))
            peak = measured * 1e12 if measured else None
            self.peak_label = "measured matmul peak"
        self.peak = peak

    # ------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                "bad_steps": self.bad_steps, "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state().tolist()}

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        # a time-budget run keeps the step count it fitted; otherwise --steps may extend a finished run
        self.total_steps = state["total_steps"] if self.tcfg.time_budget else self.tcfg.steps
        self.tokens_seen, self.bad_steps = state["tokens_seen"], state.get("bad_steps", 0)
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.resumed_from = state["checkpoint"]

    def _write_run_config(self) -> None:
        cfg = {"model": self.mcfg.to_dict(), "train": self.tcfg.to_dict(),
               "data": dataclasses.asdict(self.dcfg) if dataclasses.is_dataclass(self.dcfg) else self.dcfg,
               "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
               "data_stats": self.data.stats}
        (self.out / RUN_CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n")

    def save(self) -> Path:
        if self.parallel is None:
            return save_checkpoint(self.out, self.step, self.model, self.optimizers, self._state(),
                                   self.data.tokenizer_path, self.tcfg.keep_last)
        # multi-process: every rank writes its shards (DCP); `moeforge convert --consolidate` makes one file
        from moeforge.distributed.checkpoint import save_sharded

        path = save_sharded(self.out / CKPT_DIR / f"step_{self.step:07d}", self.model, self.optimizers,
                            self.parallel, self._state(), self.data.tokenizer_path)
        if self.is_main:
            for old in checkpoints(self.out)[self.tcfg.keep_last :]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    @staticmethod
    def _log(metrics, row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    # ------------------------------------------------------------ steps
    def _autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; None when the loss was not finite and the step was skipped."""
        cfg = self.tcfg
        lr = cfg.lr * lr_multiplier(self.step, self.total_steps, cfg)
        set_lr(self.optimizers, lr)
        self.model.train()
        counts = torch.zeros(len(self.moes), self.mcfg.moe.n_routed_experts, device=self.device)
        sums: dict[str, float] = {}
        finite = True
        par = self.parallel
        for _ in range(cfg.grad_accum):
            window = self.sampler.next()
            if par is not None:
                window = window.chunk(self.world)[par.rank]
            window = window.to(self.device)
            with self._autocast():
                if par is None:  # the head runs fused with the loss
                    out = self.forward(window[:, :-1], logits=False)
                    losses = compute_losses(out, window, cfg, self.model.lm_head.weight)
                else:  # FSDP gathers the head weight inside forward only: take the logits
                    out = self.forward(window[:, :-1])
                    losses = compute_losses(out, window, cfg)
            if not torch.isfinite(losses["loss"]):
                finite = False
                break
            (losses["loss"] / cfg.grad_accum).backward()
            if self.moes:
                counts += out.expert_counts
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        params = [p for p in self.model.parameters() if p.grad is not None]
        if par is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        else:
            flag = torch.tensor([1.0 if finite else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # skip on every rank or on none
            finite = bool(flag.item())
            if finite:
                par.sync_expert_grads()
                grad_norm = par.clip_grad_norm(params, cfg.grad_clip)
            else:
                grad_norm = torch.tensor(float("nan"))
        if not finite or not torch.isfinite(grad_norm):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.bad_steps += 1
            warnings.warn(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                          f"({self.bad_steps} in a row, abort at {cfg.max_bad_steps})", stacklevel=2)
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingAborted(f"{self.bad_steps} non-finite steps in a row; training aborted, the last good "
                                      f"checkpoint in {self.out / 'checkpoints'} is untouched (lower --lr?)")
            return None
        if par is not None:  # token counts and logged losses over all ranks: every rank's bias stays identical
            counts = par.sum_all(counts)
            sums = {k: par.mean_all(v) for k, v in sums.items()}
        self.bad_steps = 0
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        update_bias(self.moes, counts, cfg.bias_update_speed)
        self.step += 1
        self.tokens_seen += cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.world
        return {**sums, "lr": lr, "grad_norm": float(grad_norm), "counts": counts}

    @torch.no_grad()
    def evaluate(self) -> float:
        from moeforge.data import eval_batches

        self.model.eval()
        total, n = 0.0, 0
        for window in eval_batches(self.data.val, self.tcfg.batch_size, self.tcfg.seq_len, self.tcfg.eval_batches):
            window = window.to(self.device)
            with self._autocast():
                out = self.forward(window[:, :-1], mtp=False)
            total += float(F.cross_entropy(out.logits.float().flatten(0, 1), window[:, 1:].flatten()))
            n += 1
        self.model.train()
        return total / max(n, 1)

    # ------------------------------------------------------------ the run
    def _mfu(self, tokens_per_s: float) -> float | None:
        return None if not self.peak else tokens_per_s * self.flops_per_token / self.peak

    def run(self) -> dict[str, Any]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cfg = self.tcfg
        metrics = (self.out / METRICS).open("a") if self.is_main else None  # rank 0 alone writes logs
        budget_s = cfg.time_budget * 60 if cfg.time_budget else None
        start_step, t_start = self.step, time.perf_counter()
        interval_counts = torch.zeros(len(self.moes), self.mcfg.moe.n_routed_experts)
        interval_from = self.step + 1
        layer_names = [f"L{i}" for i, layer in enumerate(self.model.layers) if layer.mlp in self.moes] + [
            f"MTP{k}" for k in range(len(self.model.mtp))]
        last_val = None
        entropy = self.data.stats.get("val_unigram_entropy")
        if self.resumed_from:
            self.console.print(f"resumed from {self.resumed_from} at step {self.step}")
        progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  MFU {task.fields[mfu]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.console.is_terminal,
        )
        try:
            with progress:
                task = progress.add_task("train", total=self.total_steps, completed=self.step, loss="-", tps="-",
                                         mfu="-")
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    result = self.train_step()
                    dt = time.perf_counter() - t0
                    if result is None:
                        continue
                    if budget_s and self.step - start_step == 5:  # fit the schedule to the time budget once
                        per_step = (time.perf_counter() - t_start) / 5
                        self.total_steps = max(self.step + 1, self.step + int((budget_s - 5 * per_step) / per_step))
                        progress.update(task, total=self.total_steps)
                    tps = cfg.grad_accum * cfg.batch_size * cfg.seq_len / dt
                    mfu = self._mfu(tps)
                    counts = result.pop("counts").cpu()
                    interval_counts += counts
                    progress.update(task, completed=self.step, loss=f"{result['loss']:.3f}", tps=f"{tps:,.0f}",
                                    mfu="n/a" if mfu is None else f"{mfu:.1%}")
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        row = {"kind": "train", "step": self.step, **{k: round(v, 6) for k, v in result.items()},
                               "tokens_per_s": round(tps, 1), "mfu": None if mfu is None else round(mfu, 5),
                               "tokens_seen": self.tokens_seen}
                        if self.moes:
                            row.update(load_stats(self.moes, counts))
                        self._log(metrics, row)
                    if self.has_val and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                        last_val = self.evaluate()
                        row = {"kind": "eval", "step": self.step, "val_loss": round(last_val, 5),
                               "val_ppl": round(math.exp(min(last_val, 50)), 3), "unigram_entropy": entropy,
                               "expert_counts": interval_counts.int().tolist(), "moe_layers": layer_names,
                               "load_from_step": interval_from}
                        if self.moes:
                            row["load_max_over_mean"] = load_stats(self.moes, interval_counts)["load_max_over_mean"]
                        self._log(metrics, row)
                        interval_counts.zero_()
                        interval_from = self.step + 1
                        progress.console.print(
                            f"step {self.step}: val loss {last_val:.4f} (ppl {math.exp(min(last_val, 50)):.1f})"
                            + (f", unigram entropy {entropy:.4f}" if entropy else "")
                            + (f", worst layer load max/mean {max(row['load_max_over_mean']):.2f}" if self.moes else ""))
                    if self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                        self.save()
        finally:
            if metrics is not None:
                metrics.close()
        ckpt = self.save()
        return {"steps": self.step, "val_loss": last_val, "unigram_entropy": entropy, "checkpoint": str(ckpt),
                "tokens_seen": self.tokens_seen, "seconds": round(time.perf_counter() - t_start, 1)}
