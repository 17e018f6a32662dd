"""MKL's vendor check on AMD CPUs: let PyTorch's fp32 BLAS use the kernels the CPU can run.

PyTorch's x86-64 builds do fp32 `mm` / `bmm` / `F.linear` with Intel MKL, which chooses its kernels
by CPU vendor before it looks at the CPU's features: on an AMD CPU it runs a generic path whatever
the chip supports. On the dev CPU (AMD EPYC with AVX-512, 2 threads) fp32 `mm` of 2048 x 512 x 2048
ran at 192 GFLOP/s and a (32, 256, 48) x (32, 48, 256) `bmm` at 154 GFLOP/s; with MKL's vendor
answer set to Intel, 442 and 384 (`benchmarks/train_step.py`: the tiny fp32 training step 7,533 ->
9,571 tok/s, HF's DeepseekV3 5,396 -> 8,171). Errors against fp64 stay those of fp32 products.

MKL asks one exported function, `mkl_serv_intel_cpu_true`, which vendor it runs on. A one-line C
library that defines it, loaded with RTLD_GLOBAL before torch loads MKL, answers first; MKL then
selects kernels by the CPU's feature flags. `enable()` does that when all of these hold:

* Linux on x86-64, the CPU is AMD and has AVX-512 F/CD/BW/DQ/VL (the instructions of MKL's AVX-512
  kernels; on other CPUs nothing changes);
* torch is not imported yet (`import moeforge` first; the `moeforge` command always is);
* a C compiler (`cc`) builds the library, once, into ~/.cache/moeforge (or $XDG_CACHE_HOME);
* MOEFORGE_FAST_MKL is not "0".

It changes the whole process: every fp32 MKL product gets faster, HF models run in the same process
included. `STATE` says what happened; `moeforge doctor` shows it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
STATE = "off: not tried"


def _cpu_flags() -> tuple[str, set[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo."""
    vendor, flags = "", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags":
            flags = set(value.split())
            break
    return vendor, flags


def _library() -> Path:
    """The compiled override, built once (to a temporary name, then renamed into place)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeforge"
    lib = cache / "mkl_intel_cpu_v1.so"
    if lib.exists():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build it")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / "mkl_intel_cpu.c", Path(tmp) / "lib.so"
        src.write_text(SOURCE)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], check=False, capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"cc failed: {r.stderr.strip()[:200]}")
        os.replace(out, lib)
    return lib


def enable() -> str:
    """Apply the override where it is safe and possible (see the module docstring); returns and sets STATE."""
    global STATE
    if STATE == "on":
        return STATE
    try:
        if os.environ.get("MOEFORGE_FAST_MKL") == "0":
            STATE = "off: MOEFORGE_FAST_MKL=0"
        elif not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")):
            STATE = "off: not Linux on x86-64"
        elif "torch" in sys.modules:
            STATE = "off: torch was imported before moeforge"
        else:
            vendor, flags = _cpu_flags()
            if vendor != "AuthenticAMD":
                STATE = f"off: not needed on {vendor or 'this CPU'}"
            elif not all(f in flags for f in AVX512):
                STATE = "off: the CPU lacks AVX-512"
            else:
                ctypes.CDLL(str(_library()), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
                STATE = "on"
    except Exception as e:  # noqa: BLE001 - never let this stop an import: MKL just keeps its generic path
        STATE = f"off: {e}"
    return STATE
