"""Does ``cnntrain bench`` time the step ``cnntrain train`` runs? Both side by side, in one run.

    python benchmarks/bench_vs_train.py --model resnet20 --batch-size 128 --precision bf16 --repeats 3
    python benchmarks/bench_vs_train.py --tiny     # batch 8, 3 steps, 1 repeat: checks that it runs

Same model, batch, precision, thread count and synthetic 32-px data (no augmentation) for both rows:

- ``bench``: ``cnntrain.bench.bench`` (the engine's ``train_step`` on a fixed batch, after warm-up),
  images per mean step time.
- ``train``: ``cnntrain.train`` on ``--dataset synthetic`` in a fresh process, the median of its logged
  per-window img/s after the first window (its data wait included, evaluation and saving excluded).

Each row runs ``--repeats`` times in rotation (fresh processes), so machine noise hits both alike; the
medians and their ratio are printed (and written as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BENCH = """
import json, sys, torch
from cnntrain.bench import bench
a = json.loads(sys.argv[1])
r = bench(a["model"], batch_size=a["batch"], steps=a["steps"], warmup=a["warmup"], precision=a["precision"],
          device="cpu", threads=a["threads"], num_classes=10)
print("RESULT", r.img_per_s)
"""


def run_bench(args) -> float:
    options = {"model": args.model, "batch": args.batch_size, "steps": args.steps, "warmup": args.warmup,
               "precision": args.precision, "threads": args.threads}
    out = subprocess.run([sys.executable, "-c", BENCH, json.dumps(options)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return float(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")).split()[1])


def run_train(args, folder: Path) -> float:
    images = args.batch_size * (args.steps + args.warmup)
    cmd = [sys.executable, "-m", "cnntrain", "train", "--dataset", "synthetic", "--synthetic-size", str(images),
           "--synthetic-shape", "3", "32", "32", "--model", args.model, "--batch-size", str(args.batch_size),
           "--precision", args.precision, "--threads", str(args.threads), "--epochs", "1", "--augment", "none",
           "--display-every", str(args.warmup), "--eval-every", "100000", "--save-every", "100000",
           "--progress", "log", "--run-dir", str(folder), "--overwrite"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    with open(folder / "metrics.csv") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f) if r["split"] == "train"]
    return statistics.median(rates[1:])  # the first window holds the warm-up


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row and repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="batch 8, 1 warm-up + 2 timed steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.steps, args.warmup, args.repeats = 8, 2, 1, 1
    rows: dict[str, list[float]] = {"bench": [], "train": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            rows["bench"].append(run_bench(args))
            rows["train"].append(run_train(args, Path(tmp) / f"run{i}"))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    result = {"model": args.model, "batch": args.batch_size, "precision": args.precision, "threads": args.threads,
              "runs": rows, "median_img_per_s": medians, "train_over_bench": medians["train"] / medians["bench"]}
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    print(f"{args.model}, batch {args.batch_size}, {args.precision}, {args.threads} threads, "
          f"{args.repeats} repeats in rotation")
    for name, values in rows.items():
        print(f"{name:<6} median {medians[name]:8.1f} img/s   runs: {', '.join(f'{v:.1f}' for v in values)}")
    print(f"train / bench = {result['train_over_bench']:.3f}")
    return result


if __name__ == "__main__":
    main()
