"""Plots of a run folder: `loss.png` (train and validation loss, lr) and `expert_load.png`.

Both read only `RUN/metrics.jsonl`, so `moeforge plot RUN` works on a finished run, a
running one, or one copied from another machine. The expert-load heatmap shows, for
each MoE layer (rows, MTP layers last) and expert (columns), the tokens the expert
received over the last evaluation interval divided by the layer's mean: 1.0 is perfect
balance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ValueError(f"{path} does not exist; is {run_dir} a moeforge run folder?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return rows


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and (when load data exists) expert_load.png into the run folder; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{run_dir / METRICS} has no training steps yet")
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train loss (total)")
    ax.plot([r["step"] for r in train], [r["main_loss"] for r in train], lw=1.2, label="train loss (next token)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", lw=1.5, label="validation loss")
        if evals[-1].get("unigram_entropy"):
            ax.axhline(evals[-1]["unigram_entropy"], ls="--", c="grey", lw=1, label="unigram entropy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in train], [r["lr"] for r in train], c="tab:red", lw=0.8, alpha=0.5)
    ax2.set_ylabel("learning rate", color="tab:red")
    ax.legend(loc="upper right")
    ax.set_title(f"{run_dir.name}: loss")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=120)
    plt.close(fig)
    written.append(run_dir / "loss.png")

    loads = [r for r in evals if r.get("expert_counts")]
    if loads:
        import numpy as np

        last = loads[-1]
        counts = np.asarray(last["expert_counts"], dtype=float)
        ratio = counts / np.maximum(counts.mean(axis=1, keepdims=True), 1e-9)
        labels = last.get("moe_layers") or [str(i) for i in range(len(ratio))]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * ratio.shape[1] + 2), max(3, 0.45 * len(ratio) + 1.5)))
        im = ax.imshow(ratio, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(ratio.max())))
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load / layer mean, steps {last.get('load_from_step', '?')}-{last['step']}\n"
                     f"(max/mean worst layer {ratio.max():.2f})")
        fig.colorbar(im, ax=ax, label="tokens / mean")
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=120)
        plt.close(fig)
        written.append(run_dir / "expert_load.png")
    return written
