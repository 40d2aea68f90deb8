"""Asynchronous parameter server vs synchronous DDP on CPU, side by side in one run: updates/s and
time to a target validation accuracy, with the same global batch per update.

    python benchmarks/async_vs_sync.py --quick                  # about a minute on 2 cores
    python benchmarks/async_vs_sync.py --tiny                   # 1 epoch of 64 images: checks that it runs
    python benchmarks/async_vs_sync.py --workers 4 --epochs 20 --target 0.95 --json out.json

Both train LeNet on generated CIFAR-10-format files (``tests/fixtures.py``: a colour per class plus
noise), batch B per update: synchronous is ``--nproc-per-node N`` with B / N per process (one
all-reduced update per step), asynchronous is ``--strategy async-ps`` with one ps and N workers
(the chief included) each pushing batches of B. Each run evaluates every ``--eval-every`` updates;
time to target is the first evaluation at or above ``--target`` (training time, from metrics.csv;
process start-up excluded, and reported separately as wall time).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures import write_cifar_python_tar  # noqa: E402 - needs the path above


def common_args(args: argparse.Namespace, data: Path, run_dir: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(data), "--no-verify", "--no-download", "--model", "lenet",
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--grad-clip", "1.0", "--augment", "none",
            "--eval-every", str(args.eval_every), "--display-every", str(args.eval_every), "--progress", "log",
            "--seed", "1", "--run-dir", str(run_dir), "--dist-timeout", "120"]


def run(argv: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cnntrain", "train", *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(f"failed: cnntrain train {' '.join(argv)}\n{out.stderr[-3000:]}")
    return time.monotonic() - started


def measure(run_dir: Path, target: float, wall: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        evals = [r for r in csv.DictReader(f) if r["split"] in ("val", "test")]
    reached = [float(r["elapsed_s"]) for r in evals if 1 - float(r["top1_err"]) >= target]
    return {"updates": summary["steps"], "train_s": summary["train_seconds"],
            "updates_per_s": summary["steps"] / summary["train_seconds"], "img_per_s": summary["img_per_s"],
            "final_top1": summary["final_top1"], "time_to_target_s": reached[0] if reached else None,
            "evaluations": len(evals), "wall_s": wall,
            "staleness": summary.get("staleness_histogram"),
            "per_worker_updates_per_s": {k: v["updates_per_s"] for k, v in summary.get("workers", {}).items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 workers, 1280 images, 8 epochs")
    p.add_argument("--workers", type=int, default=2, help="processes (sync) / workers incl. the chief (async)")
    p.add_argument("--batch", type=int, default=32, help="global batch per update")
    p.add_argument("--train", type=int, default=5000, help="training images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=20, help="updates between evaluations")
    p.add_argument("--target", type=float, default=0.95, help="validation top-1 to reach")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="2 workers, 64 images, 1 epoch of batch 16")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.train, args.test, args.epochs, args.target = 2, 1280, 200, 8, 0.9
    if args.tiny:
        args.workers, args.batch, args.train, args.test, args.epochs, args.eval_every = 2, 16, 64, 32, 1, 2
    if args.batch % args.workers:
        sys.exit("--batch must be a multiple of --workers (the synchronous run splits it)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // args.workers)
    results = {}
    with tempfile.TemporaryDirectory(prefix="async-vs-sync-") as tmp:
        root = Path(tmp)
        write_cifar_python_tar(root / "data", 10, n_train=args.train, n_test=args.test)
        sync_dir, async_dir = root / "sync", root / "async"
        wall = run(["--nproc-per-node", str(args.workers), "--batch-size", str(args.batch // args.workers),
                    "--threads", str(threads), *common_args(args, root / "data", sync_dir)], threads)
        results["sync"] = measure(sync_dir, args.target, wall)
        wall = run(["--strategy", "async-ps", "--ps", "1", "--workers", str(args.workers), "--batch-size",
                    str(args.batch), "--threads", str(threads), *common_args(args, root / "data", async_dir)], threads)
        results["async"] = measure(async_dir, args.target, wall)

    import torch

    print(f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; LeNet on {args.train} generated CIFAR-10-format images "
          f"({args.test} test), {args.epochs} epochs, global batch {args.batch} per update, lr {args.lr}, "
          f"{args.workers} workers, {threads} thread(s) each, load average {os.getloadavg()[0]:.1f} at the end")
    rows = [("", f"sync DDP ({args.workers} x {args.batch // args.workers})",
             f"async-ps (1 ps, {args.workers} x {args.batch})")]
    s, a = results["sync"], results["async"]

    def fmt(value, spec):
        return "not reached" if value is None else format(value, spec)

    rows += [("updates", f"{s['updates']}", f"{a['updates']}"),
             ("updates/s", fmt(s["updates_per_s"], ".1f"), fmt(a["updates_per_s"], ".1f")),
             ("img/s", fmt(s["img_per_s"], ".0f"), fmt(a["img_per_s"], ".0f")),
             (f"time to {100 * args.target:.0f}% top-1 (s)", fmt(s["time_to_target_s"], ".1f"),
              fmt(a["time_to_target_s"], ".1f")),
             ("final top-1", f"{100 * s['final_top1']:.1f}%", f"{100 * a['final_top1']:.1f}%"),
             ("training time (s)", f"{s['train_s']:.1f}", f"{a['train_s']:.1f}"),
             ("wall time incl. start-up (s)", f"{s['wall_s']:.1f}", f"{a['wall_s']:.1f}")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))))
    per_worker = ", ".join(f"{k} {v:.1f}" for k, v in a["per_worker_updates_per_s"].items())
    print(f"async: updates/s per worker: {per_worker}; staleness histogram (0, 1, 2, ... updates): {a['staleness']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
