"""`moeforge plan compare`: one model on every catalog chip, side by side, with a bar chart.

Training rows are `plan_train(..., days=D)` per chip; serving rows `plan_serve`. Two
extra numbers the debate about MoE on export-restricted hardware turns on:

* the sparsity dividend: chip-hours a dense model of the same TOTAL size would need
  (`formulas.dense_train_flops_per_token`) over the MoE's, on the same chip and MFU;
  for serving, the decode-bound ratio (`plan_serve`'s `dense_equivalent`);
* vendor-pair ratios: for every chip of one vendor against every chip of another, how
  many of the second are needed per chip of the first (chips_b / chips_a).

A chip that cannot run the requested precision gets a row with the refusal instead of numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeforge.config import ModelConfig
from moeforge.plan import formulas as F
from moeforge.plan.catalog import Chip
from moeforge.plan.serve import plan_serve
from moeforge.plan.train import plan_train


def compare_train(cfg: ModelConfig, chips: dict[str, Chip], tokens: float, days: float, **kw: Any) -> dict[str, Any]:
    """Training plans for `days` on every chip, the dense-equivalent chip-hours and vendor ratios."""
    rows = []
    seq_len = kw.get("seq_len", 4096)
    dense_fpt = F.dense_train_flops_per_token(cfg, seq_len)
    for name, chip in chips.items():
        try:
            p = plan_train(cfg, chip, tokens, days=days, **kw)
        except ValueError as e:
            rows.append({"hardware": name, "vendor": chip.vendor, "error": str(e)})
            continue
        dense_hours = F.chip_hours(tokens * dense_fpt, p["peak_tflops"], p["mfu"])
        rows.append({
            "hardware": name, "vendor": chip.vendor, "chips": p["chips"], "chip_hours": p["chip_hours"],
            "days": p["days"], "total_hbm_tb": p["chips"] * chip.get("hbm_gb") / 1e3, "energy_mwh": p["energy_mwh"],
            "fits": p["fits"], "layout": p["layout"], "memory_per_chip_gb": p["memory_per_chip_gb"],
            "dense_chip_hours": dense_hours, "dense_chips": -(-dense_hours // (days * 24)),
            "sparsity_dividend": dense_hours / p["chip_hours"], "estimated": chip.estimated,
        })
    n = F.model_numbers(cfg)
    return {"model": cfg.name, "kind": "train", "tokens": tokens, "days": days,
            "total_params": n["total_params"], "active_params": n["active_params"], "rows": rows,
            "vendor_ratios": vendor_ratios(rows, "chips")}


def compare_serve(cfg: ModelConfig, chips: dict[str, Chip], **kw: Any) -> dict[str, Any]:
    """Serving plans on every chip (fewest chips that hold the weights and the caches)."""
    rows = []
    for name, chip in chips.items():
        try:
            p = plan_serve(cfg, chip, **kw)
        except ValueError as e:
            rows.append({"hardware": name, "vendor": chip.vendor, "error": str(e)})
            continue
        rows.append({
            "hardware": name, "vendor": chip.vendor, "chips": p["chips"], "chips_for_weights": p["chips_for_weights"],
            "weights_gb_per_chip": p["weights_gb"] / p["chips"], "max_concurrency": p["max_concurrency"],
            "decode_tokens_per_s_bound": p["decode_tokens_per_s_bound"],
            "prefill_tokens_per_s_bound": p["prefill_tokens_per_s_bound"],
            "sparsity_dividend": p["dense_equivalent"]["sparsity_dividend"],
            "single_sequence_dividend": p["dense_equivalent"]["single_sequence_dividend"],
            "estimated": chip.estimated,
        })
    n = F.model_numbers(cfg)
    return {"model": cfg.name, "kind": "serve", "context": kw.get("context"), "concurrency": kw.get("concurrency"),
            "total_params": n["total_params"], "active_params": n["active_params"], "rows": rows,
            "kv_bytes_per_token": F.kv_bytes_per_token(cfg), "vendor_ratios": vendor_ratios(rows, "chips")}


def vendor_ratios(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """For every pair of chips from different vendors: b's `key` / a's `key` (chips of b per chip of a)."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for i, a in enumerate(ok):
        for b in ok[i + 1:]:
            if a["vendor"] != b["vendor"]:
                out.append({"a": a["hardware"], "b": b["hardware"], "ratio": b[key] / a[key]})
    return out


def plot_compare(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG of horizontal bars per chip: chips needed (MoE vs dense same-size for training), and energy
    (training) or decode tokens/s (serving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    if not rows:
        raise ValueError("no chip could run this plan; nothing to plot")
    names = [r["hardware"] + ("*" if r["estimated"] else "") for r in rows]
    colors = ["#76b900" if r["vendor"] == "NVIDIA" else "#c7000b" if r["vendor"] == "Huawei" else "#888888"
              for r in rows]
    y = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2.2))
    ax = axes[0]
    if result["kind"] == "train":
        ax.barh([i + 0.2 for i in y], [r["dense_chips"] for r in rows], height=0.4, color="#cccccc",
                label="dense model, same total size")
        ax.barh([i - 0.2 for i in y], [r["chips"] for r in rows], height=0.4, color=colors, label="this MoE")
        ax.set_title(f"chips to train {result['tokens'] / 1e12:g}T tokens in {result['days']:g} days")
        ax.legend(loc="lower right", fontsize=8)
        right = [r["energy_mwh"] for r in rows]
        axes[1].set_title("energy at TDP (MWh)")
    else:
        ax.barh(list(y), [r["chips"] for r in rows], color=colors)
        ax.set_title(f"chips to serve {result['concurrency']} x {result['context']:,}-token sequences")
        right = [r["decode_tokens_per_s_bound"] for r in rows]
        axes[1].set_title("decode tokens/s bound on those chips (HBM bandwidth)")
    for a in axes:
        a.set_yticks(list(y))
        a.set_yticklabels(names)
        a.invert_yaxis()
        a.grid(axis="x", alpha=0.3)
    if result["kind"] == "train":
        axes[0].set_xscale("log")
    axes[1].barh(list(y), [v or 0 for v in right], color=colors)
    for i, v in enumerate(right):
        axes[1].text(v or 0, i, f" {v:,.0f}" if v is not None else " n/a (TDP not published)", va="center",
                     fontsize=8)
    for i, r in enumerate(rows):
        axes[0].text(r["chips"], i - (0.2 if result["kind"] == "train" else 0), f" {r['chips']:,}", va="center",
                     fontsize=8)
    fig.suptitle(f"{result['model']}: {result['total_params'] / 1e9:,.0f}B total / "
                 f"{result['active_params'] / 1e9:,.1f}B active   (* = some chip figures estimated)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
