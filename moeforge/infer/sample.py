"""Sampling as pure functions of logits and an explicit `torch.Generator`, and a simple generator.

`sample_next` applies temperature, top-k and top-p (nucleus) filtering and draws one token
per row; temperature 0 is greedy. `generate` is a one-sequence convenience wrapper over
the batched engine (moeforge/infer/engine.py), used for the trainer's samples.

Shapes: B batch, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moeforge.model.transformer import Transformer


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits -> filtered, temperature-scaled fp32 logits (-inf where excluded)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    x = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(B, V) logits -> (B,) next token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids for a (1, T) prompt until max_new_tokens or eos (a batch-1 `Engine`; V3 or V4)."""
    from moeforge.infer.engine import Engine, SamplingParams

    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (1, T) tensor of ids, got shape {tuple(prompt.shape)}")
    limit = model.cfg.max_position_embeddings
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} tokens")
    if max_new_tokens <= 0:
        return
    engine = Engine(model, max_batch=1, max_len=prompt.shape[1] + max_new_tokens)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            ignore_eos=True)
    for token in engine.stream(prompt[0].tolist(), params, generator):
        if eos_token_id is not None and token == eos_token_id:
            return
        yield token
