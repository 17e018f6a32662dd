"""The hardware catalog: what each chip can do, with a source beside every figure.

The figures live in `hardware.json` next to this file (package data), one entry per chip
as sold (a package: an Ascend 910C counts once though torch sees two 64 GB devices).
Each field is `{"value": number | null, "source": text}`; null means "not supported"
for a precision (the planner refuses to plan it) and "not published" elsewhere (the
planner prints n/a). Where sources disagree a `range` is kept and `value` is the figure
used. `--hardware-file` adds or overrides entries with the same shape (plain numbers are
accepted too, their source becomes the file name).

The `cpu` entry is measured on this machine when asked for: peak = the best square-matmul
rate `moeforge.device.matmul_tflops` measures, memory = physical RAM, bandwidth = a
timed large-tensor copy.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PRECISIONS = ("bf16", "fp8", "fp4")
FIELDS = ("bf16_tflops", "fp8_tflops", "fp4_tflops", "hbm_gb", "hbm_tbps", "scale_up_gbps", "scale_up_domain",
          "scale_out_gbps", "tdp_w", "usd_per_hour")
REQUIRED = ("hbm_gb", "hbm_tbps")  # a chip without these cannot be planned at all


@dataclass(frozen=True)
class Chip:
    """One catalog entry. Numbers are None where not supported / not published."""

    name: str
    vendor: str
    description: str
    values: dict[str, float | None]
    sources: dict[str, str]
    ranges: dict[str, list[float]] = field(default_factory=dict)

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    def tflops(self, precision: str) -> float | None:
        """Dense peak TFLOPS in `precision` (bf16 | fp8 | fp4); None where the chip has no such units."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        return self.values.get(f"{precision}_tflops")

    def require_precision(self, precision: str, what: str = "plan", flag: str = "--precision") -> float:
        """Peak TFLOPS in `precision`, or a ValueError saying the chip cannot do it."""
        peak = self.tflops(precision)
        if peak is None:
            have = [p for p in PRECISIONS if self.tflops(p) is not None]
            raise ValueError(
                f"{self.name} has no {precision.upper()} support ({self.sources.get(f'{precision}_tflops', 'no figure')}); "
                f"cannot {what} in {precision}: use {flag} {' or '.join(have) or 'with another chip'}")
        return peak

    @property
    def estimated(self) -> list[str]:
        """Fields whose source says ESTIMATE."""
        return [k for k, s in self.sources.items() if "ESTIMATE" in s and self.values.get(k) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vendor": self.vendor, "description": self.description, **self.values,
                "sources": self.sources, "ranges": self.ranges}


def _parse_entry(name: str, raw: dict[str, Any], origin: str) -> Chip:
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: chip {name!r} must be a JSON object")  # noqa: TRY004
    unknown = set(raw) - set(FIELDS) - {"vendor", "description"}
    if unknown:
        raise ValueError(f"{origin}: chip {name!r} has unknown field(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
    values: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    ranges: dict[str, list[float]] = {}
    for key in FIELDS:
        item = raw.get(key)
        if isinstance(item, dict):
            value, source = item.get("value"), str(item.get("source", origin))
            if "range" in item:
                ranges[key] = [float(x) for x in item["range"]]
        else:
            value, source = item, (origin if item is not None else "not given")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{origin}: {name}.{key} must be a positive number or null (got {value!r})")
            value = float(value)
        values[key], sources[key] = value, source
    for key in REQUIRED:
        if values[key] is None:
            raise ValueError(f"{origin}: chip {name!r} needs {key}")
    if all(values[f"{p}_tflops"] is None for p in PRECISIONS):
        raise ValueError(f"{origin}: chip {name!r} needs at least one of bf16_tflops, fp8_tflops, fp4_tflops")
    return Chip(name=name, vendor=str(raw.get("vendor", "other")), description=str(raw.get("description", name)),
                values=values, sources=sources, ranges=ranges)


def _read_chips(text: str, origin: str) -> dict[str, Chip]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin} is not valid JSON ({e.msg} at line {e.lineno})") from None
    chips = d.get("chips", d) if isinstance(d, dict) else None
    if not isinstance(chips, dict):
        raise ValueError(f"{origin} must hold a JSON object of chips ({{\"chips\": {{NAME: {{...}}}}}})")  # noqa: TRY004
    return {name.lower(): _parse_entry(name.lower(), raw, origin) for name, raw in chips.items() if not name.startswith("_")}


def load_catalog(hardware_file: str | Path | None = None) -> dict[str, Chip]:
    """The built-in chips (not `cpu`), plus or overridden by the entries in `hardware_file`."""
    text = resources.files("moeforge.plan").joinpath("hardware.json").read_text()
    chips = _read_chips(text, "moeforge/plan/hardware.json")
    if hardware_file is not None:
        p = Path(hardware_file)
        try:
            user_text = p.read_text()
        except FileNotFoundError:
            raise ValueError(f"hardware file {p} does not exist") from None
        chips.update(_read_chips(user_text, str(p)))
    return chips


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def _copy_tbps(mbytes: int = 256) -> float:
    """Memory bandwidth from the best of a few large tensor copies (read + write = 2x the bytes)."""
    import torch

    src = torch.empty(mbytes * 2**20, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best / 1e12


def measure_cpu() -> Chip:
    """A `cpu` entry measured here: bf16 = the faster of the measured bf16 / fp32 matmul rates."""
    from moeforge.device import accelerator_name, matmul_tflops

    t = matmul_tflops("cpu")
    fast = max((v, k) for k, v in t.items() if v is not None)
    how = f"measured here: best {fast[1]} square matmul (moeforge.device.matmul_tflops)"
    values = dict.fromkeys(FIELDS, None)
    sources = dict.fromkeys(FIELDS, "not applicable to one host")
    values.update(bf16_tflops=fast[0], hbm_gb=_ram_gb(), hbm_tbps=_copy_tbps(), scale_up_domain=1.0)
    sources.update(bf16_tflops=how, hbm_gb="physical RAM (os.sysconf)", hbm_tbps="measured here: 256 MiB tensor copy",
                   scale_up_domain="one host", fp8_tflops="no FP8 matmul on CPU", fp4_tflops="no FP4 matmul on CPU",
                   tdp_w="not measured", usd_per_hour="not set: pass --price")
    return Chip(name="cpu", vendor="local", description=accelerator_name("cpu"), values=values, sources=sources)


def get_chip(name: str, hardware_file: str | Path | None = None) -> Chip:
    """A chip by its command-line name (`h800`, `ascend-910b`, `cpu`, or one from `hardware_file`)."""
    catalog = load_catalog(hardware_file)
    key = name.lower()
    if key in catalog:
        return catalog[key]
    if key == "cpu":
        return measure_cpu()
    raise ValueError(f"unknown hardware {name!r}; choose one of: {', '.join([*catalog, 'cpu'])} "
                     "(or add your own with --hardware-file)")
