"""Which accelerator to run on, which dtype to use there, and `moeforge doctor`.

The rest of moeforge asks this module instead of calling `torch.cuda.*`: detection goes
through `torch.accelerator` (CUDA / ROCm, Intel XPU, Apple MPS, and Ascend NPU once
`torch_npu` is imported), so the same code runs wherever PyTorch does. Capabilities are
probed, not assumed: a tiny op on the device says whether a dtype, complex numbers or
grouped matmul work, and a few-millisecond matmul timing says whether a dtype is fast.
Probes are cached per (device, dtype) with `functools.lru_cache`.

`PEAK_TFLOPS` holds dense (no sparsity) vendor peaks for known chips; the trainer divides
achieved FLOP/s by `peak_flops(device, dtype)` for MFU.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import platform
import sys
import time
from types import MappingProxyType
from typing import Any

import torch

from moeforge import _mkl
from moeforge.ops.onednn import mm, onednn_fp32_faster

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Dense peak TFLOPS by chip-name substring (matched case-insensitively, longest first).
# Sources: /work/shared/REFERENCE.md chip table (vendor datasheets as quoted by third
# parties; treat as estimates). fp32 is the non-tensor-core FP32 rate: with TF32 matmuls
# enabled an fp32 run can exceed it. Unknown figures are left out (peak_flops -> None).
PEAK_TFLOPS: MappingProxyType[str, MappingProxyType[str, float]] = MappingProxyType({
    "H100 PCIe": MappingProxyType({"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),  # NVIDIA H100 datasheet
    "H100": MappingProxyType({"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # H100 SXM
    "H800": MappingProxyType({"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # H100 compute, narrower NVLink
    "H200": MappingProxyType({"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # H100 compute, 141 GB HBM3e
    "B200": MappingProxyType({"bf16": 2250.0, "fp16": 2250.0}),
    "A100": MappingProxyType({"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # NVIDIA A100 datasheet
    # Ascend 910B: sources disagree (~280-376 FP16); the low end, low confidence.
    "910B": MappingProxyType({"bf16": 280.0, "fp16": 280.0}),
    "910C": MappingProxyType({"bf16": 800.0, "fp16": 800.0}),  # ~800 FP16 per package [3P]
})


# ------------------------------------------------------------------ host memory
@functools.cache
def tune_host_memory() -> dict[str, bool]:
    """Linux: the two host-allocator settings the CLI and the benchmark scripts run under.

    Both help the MoE block most: its token-expert row buffers are large, short-lived and read
    and written row by row in expert order. Call before PyTorch's first CPU allocation (the CLI
    and the benchmarks call it first thing): the huge-page setting is read then. Returns what was
    applied: {"keep_freed": ..., "huge_pages": ...}.
    """
    return {"keep_freed": keep_freed_host_memory(), "huge_pages": huge_pages_for_large_tensors()}


def keep_freed_host_memory() -> bool:
    """Linux/glibc: serve large host allocations from the heap and keep freed memory in the process.

    glibc's default hands every allocation above 128 KiB-32 MiB to `mmap` and returns it on free,
    so each training step's fresh activation tensors start as untouched pages and pay a page fault
    per 4 KiB on first write. For the MoE block's (tokens x top-k, hidden) row buffers that was
    ~17% of a forward + backward step on the dev CPU (benchmarks/moe_layer.py; the dense MLP
    gained ~3%). The process keeps its peak heap instead of returning it, which is what a
    training or serving process does anyway. Set MOEFORGE_KEEP_FREED_MEMORY=0 to leave the
    allocator alone. Returns whether it took effect.
    """
    if os.environ.get("MOEFORGE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def huge_pages_for_large_tensors() -> bool:
    """Linux: ask PyTorch to advise transparent huge pages for CPU tensors of 2 MiB and more.

    Sets PyTorch's own `THP_MEM_ALLOC_ENABLE=1` unless the user set it (to anything: `0` opts
    out). PyTorch reads it at its first CPU allocation, so this must run before that. The routed
    experts gather, scatter-add and multiply rows of tensors of tens of MiB in expert order; with
    4 KiB pages those accesses miss the TLB. On the dev CPU (THP mode `madvise`) it raised
    benchmarks/moe_layer.py's block from 0.83 to 0.89 of the dense MLP (dense unchanged) in two of
    three alternating runs (docs/benchmarks.md). Large tensors then take memory in 2 MiB pages.
    Returns whether huge pages are requested for this process (by us or by the user).
    """
    if not sys.platform.startswith("linux"):
        return False
    if "THP_MEM_ALLOC_ENABLE" not in os.environ:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


# ------------------------------------------------------------------ detection
@functools.cache
def _load_plugins() -> tuple[str, ...]:
    """Import out-of-tree device plugins that register themselves with torch (today: torch_npu)."""
    loaded = []
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch_npu  # noqa: F401  (registers the `npu` device and the hccl backend)

            loaded.append("torch_npu")
        except Exception:  # noqa: BLE001, S110 - a broken install means "no NPU", not a crash
            pass
    return tuple(loaded)


def default_device() -> torch.device:
    """The current accelerator (cuda/rocm, npu, xpu, mps, ...) with its current index, else CPU."""
    _load_plugins()
    acc = torch.accelerator.current_accelerator(check_available=True)
    if acc is None:
        return torch.device("cpu")
    return torch.device(acc.type, torch.accelerator.current_device_index())


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def accelerator_name(device: torch.device | str) -> str:
    """A human-readable chip name: 'NVIDIA H200', 'Ascend910B3', the CPU model, ..."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        if device.type in ("npu", "xpu") and hasattr(getattr(torch, device.type, None), "get_device_name"):
            return getattr(torch, device.type).get_device_name(device)
        if device.type == "mps":
            return f"Apple {platform.machine()} (MPS)"
    except Exception:  # noqa: BLE001
        return device.type
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


# ------------------------------------------------------------------ probes
@functools.cache
def dtype_runs(device: str, dtype: torch.dtype) -> bool:
    """Can this device run a matmul (and its result's transfer to CPU) in `dtype`?"""
    try:
        a = torch.randn(16, 16, device=device).to(dtype)
        return bool(torch.isfinite((a @ a).float().cpu()).all())
    except Exception:  # noqa: BLE001 - any failure means "not supported here"
        return False


SLOW_PRODUCT_S = 0.005  # a 256-matrix product slower than this (< ~7 GFLOP/s): the dtype is emulated here


def _product_size(dev: torch.device, dt: torch.dtype, n: int) -> int | None:
    """n, or 256 where a 256-matrix product in dt takes over SLOW_PRODUCT_S; None where it fails."""
    try:
        small = torch.randn(256, 256, device=dev).to(dt)
        for _ in range(2):  # the first call may pay library set-up
            _sync(dev)
            t0 = time.perf_counter()
            mm(small, small)
            _sync(dev)
        return n if time.perf_counter() - t0 <= SLOW_PRODUCT_S else 256
    except Exception:  # noqa: BLE001 - the dtype is then reported as failing
        return None


@functools.cache
def matmul_tflops(device: str) -> dict[str, float | None]:
    """Measured square-matmul throughput (TFLOPS) per name in `DTYPES`; None where the dtype fails.

    fp32 on CPU runs through moeforge.ops.onednn.mm, so the figure is the kernel the model's
    products use (oneDNN where it beats MKL, as on AMD CPUs whose MKL runs its generic code path
    because moeforge._mkl could not answer MKL's vendor check; MKL otherwise).
    n = 1024 on CPU, 2048 on accelerators: big enough to be compute-bound (a 256-matrix
    reached only ~2/3 of the sustained fp32 rate on the dev CPU), small enough
    to take a few ms per dtype. A dtype whose 256-matrix product takes over SLOW_PRODUCT_S is
    emulated (fp16 on CPUs without fp16 units: 2 s per 1024-matrix product on the dev CPU, so
    measuring it at full size cost every `moeforge train` and `moeforge doctor` ~10 s) and is timed at 256.
    The dtypes are timed in interleaved rounds and each keeps its best round, so a burst of load
    from other processes hits them alike.
    """
    dev = torch.device(device)
    n, rounds = (1024, 3) if dev.type == "cpu" else (2048, 10)
    size = {name: _product_size(dev, dt, n) for name, dt in DTYPES.items() if dtype_runs(device, dt)}
    pairs = {name: tuple(torch.randn(k, k, device=dev).to(DTYPES[name]) for _ in range(2))
             for name, k in size.items() if k}
    best = dict.fromkeys(pairs, float("inf"))
    failed: set[str] = set()
    for r in range(rounds + 2):  # the first two rounds are warm-up (library init, kernel choice)
        for name, (a, b) in pairs.items():
            if name in failed:
                continue
            try:
                _sync(dev)
                t0 = time.perf_counter()
                mm(a, b)  # fp32 on CPU: oneDNN where it beats MKL, as the model's products run
                _sync(dev)
                if r >= 2:
                    best[name] = min(best[name], time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                failed.add(name)
    return {
        name: None if name not in pairs or name in failed else 2 * size[name] ** 3 / best[name] / 1e12
        for name in DTYPES
    }


def speed_vs_fp32(device: str) -> dict[str, float | None]:
    """Measured matmul throughput of each dtype relative to fp32 on `device` (fp32 = 1.0)."""
    t = matmul_tflops(device)
    base = t["float32"]
    return {name: None if v is None or not base else v / base for name, v in t.items()}


@functools.cache
def _cpu_has_bf16_units() -> bool | None:
    """Does the CPU advertise native bf16 dot products (x86 avx512_bf16 / amx_bf16, Arm bf16)? None: unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return None


@functools.cache
def complex_ops_work(device: str) -> bool:
    """Do complex tensors (view_as_complex, polar, complex multiply) run here? Not on Ascend NPUs."""
    try:
        x = torch.randn(4, 2, device=device)
        z = torch.view_as_complex(x) * torch.polar(torch.ones(4, device=device), torch.zeros(4, device=device))
        return bool(torch.allclose(torch.view_as_real(z).cpu(), x.cpu()))
    except Exception:  # noqa: BLE001
        return False


@functools.cache
def scaled_mm_fp8_works(device: str) -> bool:
    """Does `torch._scaled_mm` run with float8_e4m3fn inputs (FP8 matmul)?"""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        a = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        y = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return bool(torch.isfinite(y.float().cpu()).all())
    except Exception:  # noqa: BLE001
        return False


def _bf16_fast(device: torch.device) -> bool:
    if device.type == "cuda":  # also ROCm
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type in ("npu", "xpu", "mps"):
        return dtype_runs(str(device), torch.bfloat16)
    # CPU (and anything unknown): only with native bf16 instructions (when the CPU says) and a
    # measured bf16 matmul no slower than fp32. Without bf16 units bf16 runs ~4x slower.
    if device.type == "cpu" and _cpu_has_bf16_units() is False:
        return False
    ratio = speed_vs_fp32(str(device))["bfloat16"]
    return ratio is not None and ratio >= 1.0


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where the device has fast bf16 matmul, else fp32 (CPUs without bf16 units: ~4x slower)."""
    device = default_device() if device is None else torch.device(device)
    return torch.bfloat16 if _bf16_fast(device) else torch.float32


def peak_tflops_for_name(name: str, dtype: torch.dtype) -> float | None:
    """Dense vendor peak for a chip name from `PEAK_TFLOPS`, None when the chip or dtype is unknown."""
    key = _SHORT.get(dtype)
    lname = name.lower()
    for chip in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if chip.lower() in lname:
            return PEAK_TFLOPS[chip].get(key) if key else None
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of `device` in `dtype` for MFU; None for CPUs and unknown chips."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    tflops = peak_tflops_for_name(accelerator_name(device), dtype)
    return None if tflops is None else tflops * 1e12


# ------------------------------------------------------------------ doctor
def _distributed_backends() -> dict[str, bool]:
    import torch.distributed as dist

    out = {"available": dist.is_available()}
    for name in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        fn = getattr(dist, f"is_{name}_available", None)
        try:
            out[name] = bool(out["available"] and fn is not None and fn())
        except Exception:  # noqa: BLE001
            out[name] = False
    out["hccl"] = "torch_npu" in _load_plugins()
    return out


def _compile_importable() -> bool:
    try:
        import torch._dynamo

        return hasattr(torch, "compile")
    except Exception:  # noqa: BLE001
        return False


def doctor_report(device: torch.device | str | None = None) -> dict[str, Any]:
    """What this machine's PyTorch can do, as a JSON-ready dict (a second or so on CPU)."""
    from moeforge.ops.grouped import grouped_mm_works

    dev = default_device() if device is None else torch.device(device)
    d = str(dev)
    acc = torch.accelerator.current_accelerator(check_available=True)
    tflops, ratio = matmul_tflops(d), speed_vs_fp32(d)
    dtypes = {
        name: {
            "runs": dtype_runs(d, dt),
            "matmul_tflops": None if tflops[name] is None else round(tflops[name], 4),
            "speed_vs_fp32": None if ratio[name] is None else round(ratio[name], 2),
            # fast: worth using instead of fp32, i.e. a matmul no slower than fp32's (fp32 itself: runs)
            "fast": ratio[name] is not None and ratio[name] >= 1.0,
        }
        for name, dt in DTYPES.items()
    }
    return {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": f"{sys.platform} {platform.machine()}",
        "accelerator": dev.type,
        "accelerator_available": acc is not None,
        "accelerator_name": accelerator_name(dev),
        "device": d,
        "device_count": torch.accelerator.device_count() if acc is not None else 0,
        "cuda_version": torch.version.cuda,
        "hip_version": getattr(torch.version, "hip", None),
        "plugins": list(_load_plugins()),
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16_units": _cpu_has_bf16_units() if dev.type == "cpu" else None,
        "default_dtype": str(default_dtype(dev)).removeprefix("torch."),
        "dtypes": dtypes,
        "fp8_scaled_mm": scaled_mm_fp8_works(d),
        "grouped_mm": {name: grouped_mm_works(dev.type, dt) for name, dt in DTYPES.items()},
        "complex_ops": complex_ops_work(d),
        "cpu_fp32_products": ("onednn" if onednn_fp32_faster() else "default") if dev.type == "cpu" else None,
        "mkl_vendor_override": _mkl.STATE,
        "native_cpu_kernels": _native_state() if dev.type == "cpu" else None,
        "distributed_backends": _distributed_backends(),
        "torch_compile_importable": _compile_importable(),
        "peak_tflops": {short: peak_tflops_for_name(accelerator_name(dev), dt) if dev.type != "cpu" else None
                        for dt, short in _SHORT.items()},
    }


def _native_state() -> str:
    """Build (once) and load moeforge's native CPU kernels; what happened (moeforge.ops.native.STATE), and where
    they are on, how their fp32 products run."""
    from moeforge.ops import native

    lib = native.ops()
    if lib is None:
        return native.STATE
    return native.STATE + (", fp32 products on MKL's sgemm directly" if lib.direct_blas() else
                           ", fp32 products through ATen's mm")


def print_doctor(report: dict[str, Any]) -> None:
    """`doctor_report` as rich tables."""
    from rich.console import Console
    from rich.table import Table

    r = report
    yes = lambda b: "[green]yes[/green]" if b else "[red]no[/red]"
    t = Table(title="moeforge doctor", title_justify="left", show_header=False)
    t.add_column("item")
    t.add_column("value")
    t.add_row("torch", f"{r['torch_version']} (python {r['python_version']}, {r['platform']})")
    t.add_row("device", f"{r['device']}: {r['accelerator_name']} ({r['device_count']} accelerator device(s))")
    if r["cuda_version"] or r["hip_version"]:
        t.add_row("cuda / hip", f"{r['cuda_version']} / {r['hip_version']}")
    if r["plugins"]:
        t.add_row("plugins", ", ".join(r["plugins"]))
    t.add_row("default dtype", r["default_dtype"])
    t.add_row("fp8 (_scaled_mm)", yes(r["fp8_scaled_mm"]))
    t.add_row("complex ops", yes(r["complex_ops"]))
    if r.get("cpu_fp32_products"):
        t.add_row("fp32 products", "oneDNN (measured faster than MKL here)" if r["cpu_fp32_products"] == "onednn"
                  else "PyTorch default (MKL / BLAS)")
    if r.get("mkl_vendor_override"):
        t.add_row("MKL fast kernels on AMD", r["mkl_vendor_override"] + " (moeforge._mkl)")
    if r.get("native_cpu_kernels"):
        t.add_row("native CPU kernels", r["native_cpu_kernels"] + " (moeforge.ops.native)")
    t.add_row("torch.compile importable", yes(r["torch_compile_importable"]))
    backends = r["distributed_backends"]
    t.add_row("distributed backends", ", ".join(k for k, v in backends.items() if v and k != "available") or "none")

    d = Table(title="dtypes (square matmul)", title_justify="left")
    for col in ("dtype", "runs", "TFLOPS", "vs fp32", "fast", "grouped_mm", "peak TFLOPS"):
        d.add_column(col)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    for name, info in r["dtypes"].items():
        tf = info["matmul_tflops"]
        peak = r["peak_tflops"].get(short[name])
        sp = info["speed_vs_fp32"]
        d.add_row(name, yes(info["runs"]), "-" if tf is None else f"{tf:.3g}", "-" if sp is None else f"{sp:.2f}x",
                  yes(info["fast"]),
                  yes(r["grouped_mm"][name]), "-" if peak is None else f"{peak:g}")
    console = Console()
    console.print(t)
    console.print(d)
