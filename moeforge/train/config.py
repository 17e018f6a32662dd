"""Training configuration: every knob of a run, with defaults sized for the `tiny` preset on a CPU.

`TrainConfig` fields become `moeforge train` flags one for one (`batch_size` ->
`--batch-size`), so the CLI never falls behind the config. A run folder records the
fully resolved model, data and training configuration in `run_config.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps (ignored when time_budget is set)
    time_budget: float | None = None  # minutes of training; the schedule is fitted once the step time is known
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # "muon": Muon for 2-D hidden matrices, AdamW for the rest
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_momentum: float = 0.95
    schedule: str = "cosine"  # warmup + cosine, warmup-stable-decay, or constant after warmup
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    dtype: str = "auto"  # autocast dtype: auto = bf16 where the device has fast bf16 matmul, else fp32
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    mtp_weight: float = 0.3  # lambda: L = L_main + lambda/D * sum_k L_mtp_k
    balance_alpha: float = 1e-4  # alpha of the sequence-wise balance loss (summed over MoE layers)
    # gamma of the auxiliary-loss-free bias update; 0 turns it off. V3 used 1e-3 over ~15T tokens;
    # a few hundred CPU steps need 1e-2 to balance (max/mean load 2.05 -> 1.14 at step 250, measured)
    bias_update_speed: float = 1e-2
    eval_every: int = 50
    eval_batches: int = 16
    ckpt_every: int = 100
    keep_last: int = 2  # checkpoints kept
    log_every: int = 1  # metrics.jsonl lines
    max_bad_steps: int = 5  # consecutive non-finite losses before the run aborts
    samples: int = 3  # generated samples printed at the end
    sample_tokens: int = 60
    seed: int = 0
    device: str | None = None  # default: the accelerator PyTorch sees, else cpu
    ep: int = 1  # expert-parallel ranks (under torchrun; world = dp_shard x ep)
    threads: int | None = None  # CPU threads (torch.set_num_threads)

    def validate(self) -> TrainConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid training config: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last", "log_every", "ep"):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(self.time_budget is None or self.time_budget > 0, f"time_budget must be > 0 minutes (got {self.time_budget})")
        need(self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        need(self.dtype in DTYPES, f"dtype {self.dtype!r} is not one of {DTYPES}")
        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        need(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (got {self.grad_clip})")
        need(self.max_bad_steps > 0, f"max_bad_steps must be > 0 (got {self.max_bad_steps})")
        for name in ("mtp_weight", "balance_alpha", "bias_update_speed"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config field(s) {sorted(unknown)}")
        return cls(**d)
