"""Batch-1 generation for DeepSeek-V4 models over their own decode cache (moeforge.model.v4_attention).

The batched `Engine` manages MLA latent caches; a V4 model keeps per-layer
`V4LayerCache`s (window, compressed entries, indexer keys, compressor state), so
`moeforge.infer.sample.generate` hands V4 models to this loop: prefill once, then one
token per step with the cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moeforge.infer.sample import sample_next


@torch.no_grad()
def generate_v4(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None,
                temperature: float, top_k: int, top_p: float) -> Iterator[int]:
    device = next(model.parameters()).device
    ids = prompt.to(device)
    out = model(ids, mtp=False, return_cache=True)
    pos = ids.shape[1]
    for _ in range(max_new_tokens):
        token = int(sample_next(out.logits[:, -1].float(), generator, temperature, top_k, top_p)[0])
        yield token
        out = model(torch.tensor([[token]], device=device), start_pos=pos, cache=out.cache, mtp=False,
                    return_cache=True)
        pos += 1
