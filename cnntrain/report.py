"""`cnntrain report RUN_DIR [RUN_DIR ...]`: a comparison table of runs and one PNG of their
validation curves."""

from __future__ import annotations

import json
from pathlib import Path

from cnntrain.engine.metrics import read_metrics
from cnntrain.errors import ConfigError


def _summary(run: Path) -> dict:
    path = run / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    if (run / "metrics.csv").is_file():
        return {"run_dir": str(run)}  # still running, or killed: the curves are still worth showing
    raise ConfigError(f"{run} is not a cnntrain run folder (no summary.json or metrics.csv)")


def report_table(runs: list[Path]) -> str:
    """One fixed-width row per run: model, data set, steps, best/final top-1, time, img/s."""
    lines = [f"{'run':<40} {'model':<14} {'dataset':<10} {'steps':>7} {'best top1':>9} {'final top1':>10} "
             f"{'time':>8} {'img/s':>8}"]
    for run in runs:
        s = _summary(run)
        seconds = f"{s['total_seconds']:.0f}s" if "total_seconds" in s else "-"
        rate = f"{s['img_per_s']:.0f}" if "img_per_s" in s else "-"
        lines.append(f"{str(run)[-40:]:<40} {s.get('model', '-'):<14} {s.get('dataset', '-'):<10} "
                     f"{s.get('steps', '-'):>7} {_pct(s, 'best_top1'):>9} {_pct(s, 'final_top1'):>10} "
                     f"{seconds:>8} {rate:>8}")
    return "\n".join(lines)


def _pct(summary: dict, key: str) -> str:
    return f"{100 * summary[key]:.2f}%" if summary.get(key) is not None else "-"


def plot_runs(runs: list[Path], out_png: Path) -> Path:
    """Overlay every run's validation/test top-1 error against epoch in ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        rows = [r for r in read_metrics(run / "metrics.csv") if r["split"] in ("val", "test")]
        ax.plot([float(r["epoch"]) for r in rows], [100 * float(r["top1_err"]) for r in rows], "o-",
                markersize=3, label=run.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def report(runs: list[str | Path], out_png: str | Path = "report.png") -> str:
    """Print-ready table of ``runs`` and the curves PNG written to ``out_png``."""
    paths = [Path(r) for r in runs]
    table = report_table(paths)
    plot_runs(paths, Path(out_png))
    return table
