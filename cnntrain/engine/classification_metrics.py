"""Per-class precision / recall / F1, expected calibration error, and the files an evaluation leaves.

    scores = class_scores(result.confusion)          # from an EvalResult's confusion matrix
    scores["macro"]["f1"], scores["weighted"]["f1"], scores["per_class"][0]["recall"]
    expected_calibration_error(result)               # from its reliability bins
    write_eval_report(run_dir / "eval", result, classes)

Rows of the confusion matrix are true classes, columns predicted ones. A class's precision is 0
when nothing was predicted as it, F1 is 0 when precision and recall both are (scikit-learn's
``zero_division=0``). The macro average is over the classes that occur in the labels or the
predictions (scikit-learn's default), the weighted one weighs each class by its images.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from cnntrain.engine.evaluate import EvalResult


def class_scores(confusion: list[list[int]]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, their macro and weighted averages, and accuracy."""
    n = len(confusion)
    support = [sum(row) for row in confusion]
    predicted = [sum(confusion[i][j] for i in range(n)) for j in range(n)]
    per_class = []
    for c in range(n):
        hit = confusion[c][c]
        precision = hit / predicted[c] if predicted[c] else 0.0
        recall = hit / support[c] if support[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"precision": precision, "recall": recall, "f1": f1, "support": support[c]})
    seen = [c for c in range(n) if support[c] or predicted[c]]
    total = sum(support)
    keys = ("precision", "recall", "f1")
    macro = {k: sum(per_class[c][k] for c in seen) / max(len(seen), 1) for k in keys}
    weighted = {k: sum(per_class[c][k] * support[c] for c in range(n)) / max(total, 1) for k in keys}
    accuracy = sum(confusion[c][c] for c in range(n)) / max(total, 1)
    return {"per_class": per_class, "macro": macro, "weighted": weighted, "accuracy": accuracy, "images": total}


def macro_f1(result: EvalResult) -> float:
    """The macro-averaged F1 of an evaluation (needs its confusion matrix)."""
    if result.confusion is None:
        raise ValueError("macro F1 needs the confusion matrix: evaluate with confusion=True")
    return class_scores(result.confusion)["macro"]["f1"]


def expected_calibration_error(result: EvalResult) -> float:
    """ECE: sum over bins of (images in bin / images) x |accuracy in bin - mean top-1 probability in bin|."""
    total = sum(result.bin_count or [])
    if not total:
        return float("nan")
    return sum(abs(correct - confidence) for correct, confidence in zip(result.bin_correct, result.bin_confidence)
               ) / total


def reliability(result: EvalResult) -> list[dict[str, float]]:
    """Per bin: its range, images, accuracy and mean confidence (empty bins: NaN)."""
    bins = len(result.bin_count or [])
    out = []
    for b, (count, confidence, correct) in enumerate(zip(result.bin_count, result.bin_confidence, result.bin_correct)):
        out.append({"low": b / bins, "high": (b + 1) / bins, "images": count,
                    "accuracy": correct / count if count else float("nan"),
                    "confidence": confidence / count if count else float("nan")})
    return out


def write_confusion_csv(path: Path, confusion: list[list[int]], classes: list[str]) -> Path:
    """The matrix as CSV: a header of predicted classes, one row per true class."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion):
            writer.writerow([name, *row])
    os.replace(tmp, path)
    return path


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_confusion(path: Path, confusion: list[list[int]], classes: list[str], title: str = "") -> Path:
    """The matrix as a PNG, each row normalised to the true class's images (counts written in cells
    up to 30 classes; tick labels up to 60)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(confusion)
    rows = [[v / max(sum(row), 1) for v in row] for row in confusion]
    side = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i][j]:
                    ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i][j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def plot_reliability(path: Path, result: EvalResult, title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, the diagonal, and the ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability(result)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = 1 / max(len(bins), 1)
    lows = [b["low"] for b in bins]
    ax.bar(lows, [b["accuracy"] if b["images"] else 0 for b in bins], width=width, align="edge",
           edgecolor="black", label="accuracy")
    ax.bar(lows, [(b["confidence"] - b["accuracy"]) if b["images"] else 0 for b in bins], width=width,
           bottom=[b["accuracy"] if b["images"] else 0 for b in bins], align="edge", color="salmon", alpha=0.5,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"{title + ': ' if title else ''}ECE {100 * expected_calibration_error(result):.2f}%")
    hist.bar(lows, [b["images"] for b in bins], width=width, align="edge", edgecolor="black")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    return _save(fig, path)


def eval_summary(result: EvalResult) -> dict[str, Any]:
    """The headline figures of an evaluation for summary.json / metrics.json."""
    out: dict[str, Any] = {"ece": expected_calibration_error(result)}
    if result.confusion is not None:
        scores = class_scores(result.confusion)
        out.update(macro_f1=scores["macro"]["f1"], weighted_f1=scores["weighted"]["f1"],
                   macro_precision=scores["macro"]["precision"], macro_recall=scores["macro"]["recall"])
    return out


def write_eval_report(folder: Path, result: EvalResult, classes: list[str], title: str = "",
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """confusion.csv, confusion.png, reliability.png and metrics.json (per-class scores, averages,
    ECE, the reliability bins, ``extra``) in ``folder``; returns metrics.json's content."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = classes or [str(i) for i in range(len(result.class_total))]
    report: dict[str, Any] = {"images": result.count, "top1": result.top1, "top5": result.top5, "loss": result.loss,
                              **eval_summary(result), **(extra or {})}
    if result.confusion is not None:
        scores = class_scores(result.confusion)
        report["per_class"] = {name: s for name, s in zip(classes, scores["per_class"])}
        report["macro"], report["weighted"] = scores["macro"], scores["weighted"]
        write_confusion_csv(folder / "confusion.csv", result.confusion, classes)
        plot_confusion(folder / "confusion.png", result.confusion, classes, title)
    if result.bin_count is not None:
        report["reliability"] = reliability(result)
        plot_reliability(folder / "reliability.png", result, title)
    tmp = folder / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, folder / "metrics.json")
    return report


def format_scores(result: EvalResult, classes: list[str]) -> list[str]:
    """Lines of a per-class table (precision, recall, F1, images) and the averages, for a terminal."""
    if result.confusion is None:
        return []
    scores = class_scores(result.confusion)
    width = max([len(c) for c in classes] + [12])
    lines = [f"  {'class':<{width}}  precision  recall      f1  images"]
    rows = [*zip(classes, scores["per_class"]), ("macro avg", {**scores["macro"], "support": scores["images"]}),
            ("weighted avg", {**scores["weighted"], "support": scores["images"]})]
    for name, s in rows:
        lines.append(f"  {name:<{width}}  {100 * s['precision']:8.2f}%  {100 * s['recall']:6.2f}%  "
                     f"{100 * s['f1']:6.2f}%  {s['support']:6d}")
    return lines
