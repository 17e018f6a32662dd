"""moeforge: DeepSeek V3/V4-family Mixture-of-Experts models in plain PyTorch."""

from moeforge import _mkl

_mkl.enable()  # before anything imports torch: MKL's fast fp32 kernels on AMD CPUs (see moeforge._mkl)

from moeforge.config import ModelConfig, get_preset, load_config
from moeforge.model.checkpoint import load_model, save_model
from moeforge.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "get_preset", "load_config", "load_model", "save_model"]
__version__ = "0.1.0"
