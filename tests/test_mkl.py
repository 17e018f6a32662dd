"""MKL's vendor override (moeforge._mkl): applied only where meant, and MKL then runs other kernels."""

import os
import subprocess
import sys

import pytest

from moeforge import _mkl

PRODUCT = (
    "import moeforge, torch, hashlib\n"
    "from moeforge import _mkl\n"
    "g = torch.Generator().manual_seed(0)\n"
    "a, b = torch.randn(512, 777, generator=g), torch.randn(777, 300, generator=g)\n"
    "c = a @ b\n"
    "print(_mkl.STATE)\n"
    "print(hashlib.sha256(c.numpy().tobytes()).hexdigest())\n"
    "print((c.double() - a.double() @ b.double()).abs().max().item())\n"
)


def _run(code: str, **env: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def _amd_avx512() -> bool:
    try:
        vendor, flags = _mkl._cpu_flags()
    except OSError:
        return False
    return sys.platform == "linux" and vendor == "AuthenticAMD" and all(f in flags for f in _mkl.AVX512)


def test_switched_off_by_the_environment_and_by_an_earlier_torch_import():
    assert _run("import moeforge; from moeforge import _mkl; print(_mkl.STATE)", MOEFORGE_FAST_MKL="0") == [
        "off: MOEFORGE_FAST_MKL=0"]
    assert _run("import torch, moeforge; from moeforge import _mkl; print(_mkl.STATE)") == [
        "off: torch was imported before moeforge"]


@pytest.mark.skipif(not _amd_avx512(), reason="the override applies to AMD CPUs with AVX-512 only")
def test_on_amd_avx512_mkl_runs_other_kernels_with_fp32_accuracy(tmp_path):
    """With the override MKL takes other kernels (the same product's bits differ), both as accurate as fp32
    products are; the library is built once into the cache folder and reused."""
    on = _run(PRODUCT, XDG_CACHE_HOME=str(tmp_path))
    lib = tmp_path / "moeforge" / "mkl_intel_cpu_v1.so"
    assert on[0] == "on" and lib.exists()
    built = lib.stat().st_mtime_ns
    off = _run(PRODUCT, MOEFORGE_FAST_MKL="0")
    assert off[0] == "off: MOEFORGE_FAST_MKL=0"
    assert on[1] != off[1]  # another kernel ran
    for out in (on, off):
        assert float(out[2]) < 1e-3  # sums of 777 products of unit normals: fp32 rounding only
    assert _run(PRODUCT, XDG_CACHE_HOME=str(tmp_path))[0] == "on"
    assert lib.stat().st_mtime_ns == built  # reused, not rebuilt
