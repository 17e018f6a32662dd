"""Model code. `build_model(cfg)` returns the right decoder for a config: the V2/V3-family
`Transformer` (MLA) or, when `cfg.v4` is set, the DeepSeek-V4 `V4Transformer`."""

from __future__ import annotations

from torch import nn

from moeforge.config import ModelConfig


def build_model(cfg: ModelConfig, impl: str = "auto") -> nn.Module:
    """The decoder for `cfg`; both kinds share the forward(...) -> ModelOutput interface."""
    if cfg.v4 is not None:
        from moeforge.model.v4 import V4Transformer

        return V4Transformer(cfg, impl)
    from moeforge.model.transformer import Transformer

    return Transformer(cfg, impl)
