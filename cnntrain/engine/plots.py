"""PNG curves of a run: loss, top-1 error and learning rate against epoch."""

from __future__ import annotations

import os
from pathlib import Path

from cnntrain.engine.metrics import read_metrics


def plot_curves(metrics_csv: Path, out_png: Path, title: str = "") -> Path:
    """Draw train/val loss, top-1 error and LR from ``metrics.csv`` into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for split, style in (("train", "-"), ("val", "o-"), ("test", "o-")):
        sel = [r for r in rows if r["split"] == split]
        if not sel:
            continue
        epochs = [float(r["epoch"]) for r in sel]
        axes[0].plot(epochs, [float(r["loss"]) for r in sel], style, label=split, markersize=3)
        axes[1].plot(epochs, [100 * float(r["top1_err"]) for r in sel], style, label=split, markersize=3)
        if split == "train":
            axes[2].plot(epochs, [float(r["lr"]) for r in sel], "-")
    for ax, name in zip(axes, ("loss", "top-1 error (%)", "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
