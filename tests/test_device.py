"""device.py: detection, dtype choice, the doctor report, chip peaks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from moeforge import device as dev

ON_CPU = not torch.accelerator.is_available()


@pytest.fixture(scope="module")
def report() -> dict:
    return dev.doctor_report()


def test_default_device():
    d = dev.default_device()
    if ON_CPU:
        assert d == torch.device("cpu")
    else:
        assert d.type == torch.accelerator.current_accelerator().type and d.index is not None


@pytest.mark.skipif(not ON_CPU, reason="CPU-only expectations")
def test_doctor_report_on_cpu(report):
    json.dumps(report)  # JSON-ready
    assert report["accelerator"] == "cpu" and report["device"] == "cpu" and report["device_count"] == 0
    assert report["torch_version"] == torch.__version__
    assert report["dtypes"]["float32"]["runs"] and report["dtypes"]["float32"]["fast"]
    assert report["dtypes"]["float32"]["speed_vs_fp32"] == 1.0
    assert report["dtypes"]["bfloat16"]["runs"] and report["dtypes"]["bfloat16"]["matmul_tflops"] > 0
    backends = report["distributed_backends"]
    assert backends["available"] and backends["gloo"]
    assert not backends["nccl"] and not backends["hccl"]
    assert set(backends) >= {"gloo", "nccl", "mpi", "ucc", "xccl", "hccl"}
    assert report["complex_ops"] and report["torch_compile_importable"]
    from moeforge.ops.onednn import onednn_fp32_faster

    assert report["cpu_fp32_products"] == ("onednn" if onednn_fp32_faster() else "default")
    assert report["grouped_mm"]["float32"] in (True, False) and set(report["grouped_mm"]) == set(dev.DTYPES)
    assert report["peak_tflops"] == {"bf16": None, "fp16": None, "fp32": None}


@pytest.mark.skipif(not ON_CPU, reason="CPU-only expectations")
def test_cpu_default_dtype_follows_measurement(report):
    # bf16 only with native bf16 instructions and a measured matmul no slower than fp32
    # (cached per process, so the report and default_dtype agree)
    bf16_fast = report["dtypes"]["bfloat16"]["fast"]
    expected = torch.bfloat16 if bf16_fast and report["cpu_bf16_units"] is not False else torch.float32
    assert dev.default_dtype(torch.device("cpu")) == expected
    assert report["default_dtype"] == str(expected).removeprefix("torch.")


def test_peaks():
    assert dev.peak_tflops_for_name("NVIDIA H200", torch.bfloat16) == 989.0
    assert dev.peak_tflops_for_name("NVIDIA H100 PCIe", torch.bfloat16) == 756.0  # longest match wins
    assert dev.peak_tflops_for_name("NVIDIA H100 80GB HBM3", torch.float32) == 67.0
    assert dev.peak_tflops_for_name("Ascend910B3", torch.float16) == 280.0
    assert dev.peak_tflops_for_name("NVIDIA B200", torch.float32) is None  # not in the table
    assert dev.peak_tflops_for_name("Some Future Chip", torch.bfloat16) is None
    assert dev.peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_print_doctor(report, capsys):
    dev.print_doctor(report)
    out = capsys.readouterr().out
    assert "float32" in out and "bfloat16" in out and "default dtype" in out
    if ON_CPU:
        assert "gloo" in out


def test_no_torch_cuda_outside_device_module():
    # Portable code goes through torch.accelerator / device strings (REFERENCE.md: torch.cuda.* breaks on NPU)
    root = Path(dev.__file__).parent
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if p.name != "device.py" and re.search(r"\btorch\.cuda\.", p.read_text())
    ]
    assert offenders == []


def test_keep_freed_host_memory_applies_on_glibc_and_can_be_disabled(monkeypatch):
    import platform
    import sys

    from moeforge.device import keep_freed_host_memory

    fn = keep_freed_host_memory
    monkeypatch.setenv("MOEFORGE_KEEP_FREED_MEMORY", "0")
    assert fn() is False
    monkeypatch.delenv("MOEFORGE_KEEP_FREED_MEMORY")
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert fn() is True


def test_huge_pages_requested_unless_the_user_chose(monkeypatch):
    import sys

    from moeforge.device import huge_pages_for_large_tensors

    if not sys.platform.startswith("linux"):
        assert huge_pages_for_large_tensors() is False
        return
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "")  # recorded, so the teardown restores the original state
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert huge_pages_for_large_tensors() is True and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice stands
    assert huge_pages_for_large_tensors() is False and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_cli_process_gets_huge_pages_for_large_tensors():
    """In a fresh process, tune_host_memory() before any allocation (as `moeforge` runs it) makes PyTorch
    advise a 64 MiB tensor's pages as huge pages (the `hg` flag of its mapping in /proc/self/smaps,
    which does not depend on how many huge pages the kernel can hand out right now); without it, not."""
    import subprocess
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux") or not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        pytest.skip("no transparent huge pages on this machine")
    code = """
import sys
if sys.argv[1] == "tuned":
    from moeforge.device import tune_host_memory
    tune_host_memory()
import torch
x = torch.ones(16 << 20)
ptr, inside = x.data_ptr() + (8 << 20), False
for line in open("/proc/self/smaps"):
    f = line.split()
    if "-" in f[0] and len(f) >= 5 and all(c in "0123456789abcdef-" for c in f[0]):
        lo, hi = (int(v, 16) for v in f[0].split("-"))
        inside = lo <= ptr < hi
    elif f[0] == "VmFlags:" and inside:
        print("hg" in f[1:])
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    advised = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                                    check=True).stdout.split() for mode in ("tuned", "plain")}
    assert advised == {"tuned": ["True"], "plain": ["False"]}


@pytest.mark.skipif(not ON_CPU, reason="CPU-only expectations")
@pytest.mark.parametrize("slow_s,full", [(float("inf"), True), (0.0, False)])
def test_emulated_dtypes_are_timed_on_small_products(monkeypatch, slow_s, full):
    """A dtype whose 256-matrix product is slower than SLOW_PRODUCT_S is timed at 256, not at full size
    (fp16 on CPUs without fp16 units took 2 s per 1024-matrix product: ~10 s for every train and doctor)."""
    sizes: list[tuple[str, int]] = []

    def recording_mm(a, b, out=None):
        sizes.append((str(a.dtype).removeprefix("torch."), a.shape[0]))
        return a  # the choice of sizes is under test, not the kernels

    monkeypatch.setattr(dev, "mm", recording_mm)
    monkeypatch.setattr(dev, "SLOW_PRODUCT_S", slow_s)
    dev.matmul_tflops.cache_clear()
    try:
        tflops = dev.matmul_tflops("cpu")
    finally:
        dev.matmul_tflops.cache_clear()  # later tests measure with the real kernels again
    assert tflops["float32"] > 0 and tflops["bfloat16"] > 0
    timed = {name for name, n in sizes if n == 1024}
    assert timed == ({name for name, v in tflops.items() if v is not None} if full else set())
    assert all(n in (256, 1024) for _, n in sizes)
