import moeforge  # noqa: F401 - first: MKL's fast fp32 kernels on AMD CPUs (moeforge._mkl)

# isort: split
import pytest
import torch

from moeforge.config import get_preset


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")
