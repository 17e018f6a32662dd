"""Shared timing helper for the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_round_robin(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each step; candidates alternate within each round, so load from
    other processes hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
