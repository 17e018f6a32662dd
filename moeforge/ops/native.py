"""moeforge's native CPU kernels (moeforge/ops/csrc), compiled on first use for this machine.

The MoE block's routed experts, forward and backward, for fp32 and bf16 CPU tensors (`experts_fwd` /
`experts_bwd`, taken by moeforge.ops.routed.routed_swiglu in training). It runs the same per-expert loop as
the Python one, with each segment's gather, SwiGLU, gate weighting and scatter-add written as one pass over
rows still in cache, the sigmoid kept from the first backward pass for the second, and no Python or
dispatcher work between the products: fp32 ones call MKL's sgemm in PyTorch's own library where PyTorch
has MKL (x86-64; elsewhere, or with MOEFORGE_NATIVE_BLAS=0, ATen's `mm`: the same numbers; `direct_blas()`
says which), bf16 ones ATen's
`mm` (oneDNN: there each segment is multiplied as `step` rows, its count rounded up to the row bucket with
zero rows, as the Python loop does for oneDNN's kernel cache). Every elementwise step runs in fp32 (the Python loop rounds to bf16
after each); the output and the input gradient are summed in fp32. Also the router's group-limited top-k
(`select_experts`) and the sort of token-expert pairs (`sort_pairs`), used by moeforge.model.moe on CPU.

With T > 1 threads and at least 2T experts with rows, the experts run side by side ("lanes"): each thread
takes whole experts, its products single-threaded (no fork/join per product or per pass, and a product of
~400 rows runs faster on one thread than split over two), summing into its own (N, D) accumulator; the
accumulators are added at the end. Experts are dealt to the lanes largest first, each to the least-loaded
lane, so the summation order depends only on the row counts and T: results repeat exactly from run to run
(what `moeforge train --resume` relies on). The T - 1 extra accumulators are allowed as long as they take
no more memory than the gate|up activations kept for the backward pass; otherwise, and with one thread, one
expert after another with each product on all threads. `set_lanes(n)` forces n lanes (n <= 0: that rule),
for tests and benchmarks. Results equal the Python loop's up to fp32 rounding (the exp, the summation
order; tested). Figures: docs/benchmarks.md.

Shapes: N tokens, D hidden, E experts of width I, M = sum(counts) sorted token-expert pairs, Mp the same
with each expert's count rounded up to `step`. experts_fwd(x (N, D), w1 (E, 2I, D), w2 (E, D, I) in x's
dtype, tok (M,) int64, counts (E,) int64, w (M,) fp32 gate weights, limit, step) -> [out (N, D) fp32,
gu (Mp, 2I)]; experts_bwd(gout (N, D) fp32, x, w1, w2, tok, counts, w, gu, limit, step, need_x, need_w1,
need_w2, need_w) -> [gx (x's dtype), gw1, gw2, gw (M,) fp32], of no elements where not needed. Bad dtypes,
shapes, counts or token ids raise RuntimeError before any pointer is followed.

The build uses torch.utils.cpp_extension (a C++ compiler and ninja; ~10-20 s once) into
~/.cache/moeforge/native-<key> (or $XDG_CACHE_HOME), the key covering the source and its path, torch's and
Python's versions and the CPU (it is compiled with -march=native); a build lock left by a killed build is
cleared after STALE_LOCK_S. `ops()` returns the loaded op namespace, or None when the
kernels cannot be had here (no compiler, a failed build, neither Linux nor macOS, or
MOEFORGE_NATIVE=0); callers then take the Python path, which computes the same thing. `STATE` says
which, and `moeforge doctor` shows it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / "moe_cpu.cpp"]
# -fno-math-errno and -fopenmp-simd let the compiler vectorise exp (glibc's libmvec on x86-64);
# -fopenmp makes at::parallel_for use PyTorch's OpenMP threads.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fopenmp"]
STALE_LOCK_S = 600  # a build lock older than this is a dead build's, not a running one's
STATE = "not tried"
_OPS = None


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key() -> str:
    h = hashlib.sha256()
    for src in SOURCES:  # the path too: ninja rebuilds when a checkout elsewhere rewrote the build file
        h.update(src.read_bytes() + str(src.resolve()).encode())
    for part in (torch.__version__, sys.version, platform.machine(), _cpu_id(), " ".join(CFLAGS)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def ops():
    """torch.ops.moeforge_native once built and loaded here, else None (see STATE for why)."""
    global STATE, _OPS
    if _OPS is not None or STATE != "not tried":
        return _OPS
    if os.environ.get("MOEFORGE_NATIVE") == "0":
        STATE = "off: MOEFORGE_NATIVE=0"
        return None
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        STATE = f"off: not built on {sys.platform}"
        return None
    cxx = os.environ.get("CXX", "c++")  # what cpp_extension compiles with
    if shutil.which(cxx) is None:
        STATE = f"off: no C++ compiler ({cxx}) to build it"
        return None
    if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) outside an activated environment
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            STATE = "off: no ninja to build it (pip install ninja)"
            return None
    try:
        from torch.utils import cpp_extension

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeforge" / f"native-{_key()}"
        cache.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(cache)
        if not any(cache.glob("*.so")):
            print("moeforge: building its native CPU kernels for this machine (once, ~20 s) ...", file=sys.stderr,
                  flush=True)
        # cpp_extension builds under a lock file in `cache`, so concurrent processes build it once
        cpp_extension.load("moeforge_native", [str(s) for s in SOURCES], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(cache), is_python_module=False,
                           verbose=False)
        _OPS = torch.ops.moeforge_native
        _register_flops(_OPS)
        STATE = "on"
    except Exception as e:  # noqa: BLE001 - any failure means "take the Python path"
        STATE = f"off: build failed ({str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__})"
    return _OPS


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove cpp_extension's build lock in build_dir if it is older than STALE_LOCK_S: a build killed outright
    (SIGKILL, power loss) leaves it behind, and every later process would wait on it forever. Returns whether
    one was removed."""
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            return True
    except FileNotFoundError:
        pass
    return False


def _register_flops(lib) -> None:
    """Let torch.utils.flop_counter count the kernels' products (accounting's tests compare against it)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(lib.experts_fwd)
    def _fwd(x_shape, w1_shape, w2_shape, tok_shape, *args, **kw) -> int:
        # the model's products (bucket padding rows not counted): gate|up 2*2I*D and down 2*I*D per pair
        return 6 * tok_shape[0] * x_shape[1] * (w1_shape[1] // 2)

    @register_flop_formula(lib.experts_bwd)
    def _bwd(gout_shape, x_shape, w1_shape, w2_shape, tok_shape, counts_shape, w_shape, gu_shape, limit, step, need_x,
             need_w1, need_w2, need_w, **kw) -> int:
        # down's weight gradient, the activation's gradient, gate|up's weight gradient, the input gradient
        products = need_w2 + (need_x or need_w1 or need_w) + 2 * need_w1 + 2 * need_x
        return products * 2 * tok_shape[0] * x_shape[1] * (w1_shape[1] // 2)
