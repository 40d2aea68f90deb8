"""Wall time to reach given validation accuracies: ResNet-20 (He et al. recipe, shortened) against
the cifar10-fast recipe, on an image folder (e.g. the CIFAR-10 training JPEGs) with a held-out split.

    python benchmarks/time_to_accuracy.py --data-dir /data/cifar10-jpeg --out tta
    python benchmarks/time_to_accuracy.py --data-dir /data/cifar10-jpeg --only cifar10-fast --fast-options "--cutout 8"
    python benchmarks/time_to_accuracy.py --runs tta/resnet20 tta/cifar10-fast --out tta   # table + plot again
    python benchmarks/time_to_accuracy.py --tiny --out /tmp/tta   # 1 epoch on a generated folder: checks it runs

Each recipe runs as ``cnntrain train`` in a fresh process with ``--val-split`` images held out and an
evaluation every epoch. Times are the run's own ``elapsed_s`` (training plus the evaluations, not the
one-time decoding of the folder, which is printed separately). Prints, per recipe, the first time
each target accuracy was reached on the held-out images and writes ``accuracy_vs_time.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnntrain.bench import machine_line  # noqa: E402 - needs the path above


def recipes(args: argparse.Namespace) -> dict[str, list[str]]:
    e = args.resnet20_epochs
    he = ["--recipe", "he2015-cifar10-resnet20", "--epochs", str(e), "--lr-milestones", str(e / 2), str(e * 3 / 4),
          "--precision", args.precision, *shlex.split(args.resnet20_options)]
    fast = ["--recipe", "cifar10-fast"] + (["--epochs", str(args.fast_epochs)] if args.fast_epochs else [])
    fast += shlex.split(args.fast_options)
    return {"resnet20": he, "cifar10-fast": fast}


def run(name: str, extra: list[str], args: argparse.Namespace) -> Path:
    run_dir = Path(args.out) / name
    cmd = [sys.executable, "-m", "cnntrain", "train", *extra, "--dataset", "folder", "--data-dir", args.data_dir,
           "--val-split", str(args.val_split), "--run-dir", str(run_dir), "--progress", "log",
           "--threads", str(args.threads)]
    print("$", " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return run_dir


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(elapsed seconds, validation accuracy %) per evaluation."""
    with open(run_dir / "metrics.csv") as f:
        return [(float(r["elapsed_s"]), 100 - 100 * float(r["top1_err"]))
                for r in csv.DictReader(f) if r["split"] not in ("train", "") and r["top1_err"]]


def first_time(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="image folder with train/<class>/*.jpg")
    p.add_argument("--runs", nargs="+", help="existing run folders to tabulate instead of training")
    p.add_argument("--out", default="time_to_accuracy", help="folder for the runs and the plot")
    p.add_argument("--val-split", type=int, default=5000)
    p.add_argument("--resnet20-epochs", type=float, default=10, help="He recipe shortened to this many epochs")
    p.add_argument("--fast-epochs", type=float, default=0, help="cifar10-fast epochs (0: the recipe's)")
    p.add_argument("--fast-options", default="", help='more cnntrain options for cifar10-fast, e.g. "--cutout 8"')
    p.add_argument("--resnet20-options", default="", help="more cnntrain options for resnet20")
    p.add_argument("--precision", default="bf16", help="precision of the resnet20 run (the fast recipe sets its own)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", choices=("resnet20", "cifar10-fast"), help="train just one of the two")
    p.add_argument("--targets", type=float, nargs="+", default=[70, 80, 85, 88, 90, 91, 92, 93, 94])
    p.add_argument("--tiny", action="store_true", help="a generated 48-image folder, 1 epoch (2 steps) of each")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="time-to-accuracy-")
    if args.tiny:
        from tests.fixtures import write_image_folder

        write_image_folder(tmp.name, [f"c{k}" for k in range(4)], per_class=12)
        args.data_dir, args.val_split, args.resnet20_epochs, args.fast_epochs = tmp.name, 16, 1, 1
        args.precision = "fp32"  # bf16 is slow, or refused, on some CPUs
        args.resnet20_options += " --batch-size 16"  # the recipes' batches are larger than the folder
        args.fast_options += " --batch-size 16"
    if not args.runs and not args.data_dir:
        p.error("give --data-dir to train, or --runs to tabulate existing runs")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    if args.runs:
        runs = {Path(r).name: Path(r) for r in args.runs}
    else:
        with tmp:
            runs = {name: run(name, extra, args) for name, extra in recipes(args).items()
                    if args.only in (None, name)}

    curves = {name: curve(d) for name, d in runs.items()}
    summaries = {name: json.loads((d / "summary.json").read_text()) for name, d in runs.items()}
    held_out = " / ".join(sorted({str(s["eval_images"]) for s in summaries.values()}))  # --runs: theirs
    print(f"\nvalidation accuracy on {held_out} held-out images; {machine_line()}")
    width = max([16] + [len(name) + 2 for name in curves])
    header = f"{'target':>8s}" + "".join(f"{name:>{width}s}" for name in curves)
    print(header)
    for target in args.targets:
        cells = []
        for points in curves.values():
            t = first_time(points, target)
            cells.append(f"{t:{width - 1}.0f}s" if t is not None else f"{'-':>{width}s}")
        print(f"{target:7.0f}%" + "".join(cells))
    for name, summary in summaries.items():
        best = max((acc for _, acc in curves[name]), default=float("nan"))
        print(f"{name}: best {best:.2f}%, final {100 * (summary['final_top1'] or 0):.2f}%, "
              f"{summary['epochs']:.1f} epochs, {summary['total_seconds']:.0f} s training, "
              f"{summary['img_per_s']:.0f} img/s overall")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([t / 60 for t, _ in points], [a for _, a in points], marker="o", label=name)
    ax.set_xlabel("wall time (minutes, training + evaluation)")
    ax.set_ylabel(f"validation accuracy (%), {held_out} held out")
    ax.set_ylim(bottom=max(0, min((a for pts in curves.values() for _, a in pts), default=0) - 5))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("CIFAR-10 time to accuracy, " + machine_line().split(", torch")[0])
    fig.tight_layout()
    fig.savefig(Path(args.out) / "accuracy_vs_time.png", dpi=120)
    print(f"plot: {Path(args.out) / 'accuracy_vs_time.png'}")


if __name__ == "__main__":
    main()
