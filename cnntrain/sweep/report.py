"""`cnntrain report SWEEP_DIR`: a sweep's trials as a table, its best configuration, and one plot
per hyperparameter of the metric against it. Read from the trial folders alone (no database needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from cnntrain.errors import ConfigError

SPEC_FILE, TRIAL_FILE = "sweep.yaml", "trial.json"


def is_sweep(path: Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def load_trials(folder: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per trial folder; a folder without trial.json is a trial still running or interrupted."""
    out = []
    for run in sorted(folder.glob("trial-*")):
        if (run / TRIAL_FILE).is_file():
            out.append(json.loads((run / TRIAL_FILE).read_text()))
            continue
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        out.append({"number": int(run.name.split("-")[1]), "state": "RUNNING", "value": None, "run_dir": str(run),
                    "params": {k: config[k] for k in spec["space"] if k in config}})
    return out


def best(trials: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    done = [t for t in trials if t["state"] == "COMPLETE" and t.get("value") is not None]
    if not done:
        return None
    return (max if direction == "maximize" else min)(done, key=lambda t: t["value"])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def sweep_table(trials: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    names = list(spec["space"])
    metric = spec["metric"]
    head = f"{'trial':>5} {'state':<9} {metric:>9} {'steps':>6} " + " ".join(f"{n:>12}" for n in names)
    lines = [head]
    for t in trials:
        value = t.get("value")
        shown = f"{100 * value:.2f}%" if value is not None and metric in ("top1", "top1_err") else _fmt(value)
        lines.append(f"{t['number']:>5} {t['state']:<9} {shown:>9} {_fmt(t.get('steps')):>6} "
                     + " ".join(f"{_fmt(t['params'].get(n)):>12}" for n in names))
    return "\n".join(lines)


def plot_params(trials: list[dict[str, Any]], spec: dict[str, Any], out_png: Path) -> Path:
    """One panel per hyperparameter: the metric of each finished trial against its value (pruned: x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(spec["space"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    percent = spec["metric"] in ("top1", "top1_err")
    for ax, name in zip(axes[0], names):
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            points = [(t["params"][name], t["value"]) for t in trials
                      if t["state"] == state and t.get("value") is not None and name in t["params"]]
            if points:
                ax.scatter([p[0] for p in points], [100 * p[1] if percent else p[1] for p in points],
                           marker=marker, label=state.lower())
        dist = spec["space"][name]
        if dist.get("log") or _spans_decades([t["params"].get(name) for t in trials]):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{spec['metric']}{' (%)' if percent else ''}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sweep {spec['study']}: {len(trials)} trials")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _spans_decades(values: list[Any]) -> bool:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return len(nums) > 1 and math.log10(max(nums) / min(nums)) >= 2


def sweep_report(folder: str | Path, out_png: str | Path | None = None) -> str:
    """The table, the best trial (its config.yaml reruns it) and where the plot went."""
    folder = Path(folder)
    if not is_sweep(folder):
        raise ConfigError(f"{folder} is not a sweep folder (no {SPEC_FILE})")
    spec = yaml.safe_load((folder / SPEC_FILE).read_text())
    trials = load_trials(folder, spec)
    out = Path(out_png) if out_png else folder / "report.png"
    plot_params(trials, spec, out)
    lines = [sweep_table(trials, spec)]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + f" of {spec['trials']} trials")
    top = best(trials, "maximize" if spec["metric"] == "top1" else "minimize")
    if top is not None:
        config = Path(top["run_dir"]) / "config.yaml"
        lines.append(f"best: trial {top['number']}, {spec['metric']} {_fmt(top['value'])}: "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in top["params"].items()))
        lines.append(f"rerun it: cnntrain train --config {config} --run-dir runs/best")
    lines.append(f"plot: {out}")
    return "\n".join(lines)
