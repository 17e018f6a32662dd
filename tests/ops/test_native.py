"""moeforge.ops.native: where the kernels cannot be had, callers take the Python path; a dead build's lock
does not block later builds."""

import os
import time

import pytest
import torch

from moeforge.ops import native, routed


@pytest.fixture
def fresh_state(monkeypatch):
    """ops() as in a new process (the loaded library itself stays registered)."""
    monkeypatch.setattr(native, "STATE", "not tried")
    monkeypatch.setattr(native, "_OPS", None)


def test_switched_off_the_python_path_runs(fresh_state, monkeypatch):
    monkeypatch.setenv("MOEFORGE_NATIVE", "0")
    assert native.ops() is None
    assert native.STATE == "off: MOEFORGE_NATIVE=0"
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(20, 8, generator=g), torch.randn(3, 12, 8, generator=g), torch.randn(3, 8, 6, generator=g)
    idx = torch.rand(20, 3, generator=g).topk(2, dim=-1).indices.flatten()
    order = idx.argsort(stable=True)
    y = routed.routed_swiglu(x.requires_grad_(), w1, w2, order // 2, torch.bincount(idx, minlength=3),
                             torch.rand(40, generator=g))
    assert type(y.grad_fn).__name__ == "_RoutedSwiGLUBackward"


def test_no_compiler_means_no_kernels(fresh_state, monkeypatch):
    monkeypatch.delenv("MOEFORGE_NATIVE", raising=False)
    monkeypatch.setenv("CXX", "no-such-compiler-moeforge")
    assert native.ops() is None
    assert native.STATE == "off: no C++ compiler (no-such-compiler-moeforge) to build it"


def test_a_dead_builds_lock_is_cleared(tmp_path):
    lock = tmp_path / "lock"
    assert not native.clear_stale_lock(tmp_path)  # no lock
    lock.write_text("")
    assert not native.clear_stale_lock(tmp_path) and lock.exists()  # a running build's: kept
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert native.clear_stale_lock(tmp_path) and not lock.exists()
