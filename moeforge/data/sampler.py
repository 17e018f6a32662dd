"""Batches from a flat token array: random training windows and fixed validation windows.

A window is `seq_len + 1` consecutive tokens: inputs are `w[:, :-1]`, targets `w[:, 1:]`.
Windows may cross the end-of-text token between documents, as in GPT-2 / nanoGPT
training. `BatchSampler` draws window starts from its own seeded `torch.Generator`,
whose state round-trips through `state_dict()` as JSON, so a resumed run draws exactly
the batches an uninterrupted one would have. `eval_batches` walks windows spread evenly
over the validation tokens: the same ones every time.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import torch


def check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array of ids (got shape {tokens.shape})")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be > 0 (got {batch_size}, {seq_len})")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"corpus too small for seq_len {seq_len}: {len(tokens)} tokens; a window needs seq_len + 1 = "
            f"{seq_len + 1}. Use more data (or a larger val_fraction for validation) or a shorter seq_len"
        )


def gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """(len(starts), seq_len + 1) int64 windows tokens[s : s + seq_len + 1]."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


class BatchSampler:
    """Random windows of seq_len + 1 tokens drawn from a seeded torch.Generator."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        check_window(tokens, batch_size, seq_len)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.draws = 0  # batches drawn so far
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def num_starts(self) -> int:
        """How many distinct windows there are: starts 0 .. len(tokens) - seq_len - 1."""
        return len(self.tokens) - self.seq_len

    def next(self) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 token windows."""
        starts = torch.randint(0, self.num_starts, (self.batch_size,), generator=self.generator)
        self.draws += 1
        return gather(self.tokens, starts.numpy(), self.seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """JSON-serialisable state; `load_state_dict` on a fresh sampler continues the same stream."""
        rng = self.generator.get_state().numpy().tobytes()
        return {
            "generator": base64.b64encode(rng).decode("ascii"),
            "seed": self.seed,
            "draws": self.draws,
            "num_tokens": len(self.tokens),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, mine in (
            ("num_tokens", len(self.tokens)),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
        ):
            if state.get(name) != mine:
                raise ValueError(
                    f"sampler state was saved with {name}={state.get(name)}, this sampler has {mine}: "
                    "resume with the same data and batch shape, or start a fresh sampler"
                )
        try:
            rng = torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8)
            self.generator.set_state(rng)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"sampler state holds no valid generator state ({e})") from None
        self.seed = int(state.get("seed", self.seed))
        self.draws = int(state.get("draws", 0))


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Deterministic validation windows, (<= batch_size, seq_len + 1) int64 each; the last batch may be smaller.

    Windows start at multiples of seq_len, so their targets never overlap (neighbours share
    only the boundary token, an input of one and the last target of the other). With
    max_batches, the windows used are spread evenly over the whole array rather than taken
    from its start, so a capped evaluation still sees every part of the split.
    """
    check_window(tokens, batch_size, seq_len)
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches must be > 0 or None for the whole split (got {max_batches})")
    available = (len(tokens) - 1) // seq_len  # windows [k*T, k*T + T] that fit
    n = available if max_batches is None else min(available, max_batches * batch_size)
    picks = (np.arange(n, dtype=np.int64) * available) // n  # distinct, evenly spaced window indices
    starts = picks * seq_len
    for i in range(0, n, batch_size):
        yield gather(tokens, starts[i : i + batch_size], seq_len)
