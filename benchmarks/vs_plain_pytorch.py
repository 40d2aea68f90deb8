"""cnntrain against the training loop a PyTorch user writes from the tutorials, side by side.

    python benchmarks/vs_plain_pytorch.py --data-dir /data/cifar10-jpeg        # real JPEGs + synthetic
    python benchmarks/vs_plain_pytorch.py --synthetic-only --steps 30          # no data needed
    python benchmarks/vs_plain_pytorch.py --synthetic-only --steps 1 --warmup 1 --window 1 --repeats 1 \
        --batch-size 8 --precisions fp32                                       # tiny: checks that it runs

Same model, batch size, thread count and step count for every row, all measured in this run:

- ``plain``: torchvision ``ImageFolder`` (or ``FakeData`` for synthetic) with the PIL transforms
  RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, a ``DataLoader`` with
  ``--workers`` worker processes, and the eager fp32 step (SGD with momentum); the main process uses
  ``--threads`` intra-op threads, as does every cnntrain row.
- ``cnntrain defaults`` / ``cnntrain fp32`` / ``cnntrain bf16``: ``cnntrain train`` on the same folder,
  in a fresh process, with its defaults (images decoded once into memory and cached, crop + flip done
  per batch on the device, channels_last) and its default precision (``--precision auto``) or the given one.
- ``plain cl-fp32``: a plain PyTorch step on one batch already in memory, channels_last, fp32: the
  compute a user gets by hand with the usual speed-up, no data loading at all.
- ``compute-only``: the same ``cnntrain train`` step on tensors already in memory, no augmentation
  (synthetic data of the same shape): the ceiling the input pipeline is judged against.

Throughput is images per second of the training steps only, after ``--warmup`` steps: for plain,
wall time of the timed steps including the wait for batches; for cnntrain, the median of its own
logged per-window img/s (which includes its data wait, and excludes evaluation). One-time costs
(DataLoader start, decoding the folder into memory) are reported separately. Each row is repeated
``--repeats`` times in rotation and the median is printed, so machine noise hits every row alike.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnntrain.bench import machine_line  # noqa: E402 - needs the path above
from cnntrain.models import create_model  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def plain_loop(args: argparse.Namespace, data_dir: str | None) -> dict:
    """The tutorial loop: PIL transforms in DataLoader workers, eager fp32 step. Returns img/s."""
    import torchvision
    import torchvision.transforms as T

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    if data_dir:
        dataset = torchvision.datasets.ImageFolder(str(Path(data_dir) / "train"), transform=transform)
    else:
        dataset = torchvision.datasets.FakeData(args.batch_size * (args.steps + args.warmup + 1), (3, 32, 32), 10,
                                                transform=transform)
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True)
    model = create_model(args.model, len(dataset.classes) if data_dir else 10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    batches = iter(loader)
    first_batch = None
    timed_from = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timed_from = time.perf_counter()
        images, labels = next(batches)
        if first_batch is None:
            first_batch = time.perf_counter() - started
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - timed_from
    del batches  # shut the workers down before the next row starts
    gc.collect()
    return {"img_per_s": args.steps * args.batch_size / seconds, "startup_s": first_batch}


def plain_compute(args: argparse.Namespace) -> dict:
    """A plain channels_last fp32 step on one batch already in memory: what a PyTorch user gets from
    the compute alone, with the usual speed-up applied by hand."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, 10).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    images = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,))
    timed_from = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timed_from = time.perf_counter()
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"img_per_s": args.steps * args.batch_size / (time.perf_counter() - timed_from), "startup_s": 0.0}


def cnntrain_run(args: argparse.Namespace, data_dir: str | None, precision: str | None, workdir: Path,
                 augment: str = "crop-flip") -> dict:
    """``cnntrain train`` in a fresh process; img/s from its own metrics.csv windows."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    steps = args.warmup + args.steps
    window = args.window
    cmd = [sys.executable, "-m", "cnntrain", "train", "--model", args.model, "--batch-size", str(args.batch_size),
           "--max-steps", str(steps), "--display-every", str(window), "--threads", str(args.threads),
           "--progress", "log", "--run-dir", str(run_dir), "--save-every", str(10**9), "--keep-last", "1",
           "--lr", "0.1", *(["--precision", precision] if precision else [])]  # None: cnntrain's default
    if data_dir:
        cmd += ["--dataset", "folder", "--data-dir", data_dir, "--val-split", str(args.batch_size)]
    else:
        cmd += ["--dataset", "synthetic", "--synthetic-size", str(args.batch_size * (steps + 1))]
    cmd += ["--augment", augment, "--pad", "4"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"cnntrain failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    # Windows that end after the warm-up steps only.
    rates = [float(r["img_per_s"]) for r in rows if int(r["step"]) > args.warmup + window - 1] or \
        [float(r["img_per_s"]) for r in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"img_per_s": statistics.median(rates), "startup_s": wall - summary["total_seconds"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="image folder with train/<class>/*.jpg (e.g. the CIFAR-10 JPEGs)")
    p.add_argument("--synthetic-only", action="store_true", help="skip the real-data rows")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--window", type=int, default=10, help="cnntrain's logging window (steps)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="precisions of the cnntrain and compute-only rows")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps % args.window or args.warmup % args.window:
        p.error("--steps and --warmup must be multiples of --window")
    if not args.synthetic_only and not args.data_dir:
        p.error("give --data-dir (an image folder with train/) or --synthetic-only")

    sources = ([("real JPEG", args.data_dir)] if not args.synthetic_only else []) + [("synthetic", None)]
    rows = [(src, name) for src, _ in sources
            for name in ("plain fp32", "cnntrain defaults", *(f"cnntrain {prec}" for prec in args.precisions))]
    rows += [("in memory", "plain cl-fp32"), *(("in memory", f"compute-only {prec}") for prec in args.precisions)]
    results: dict[tuple[str, str], list[dict]] = {r: [] for r in rows}
    data_of = dict(sources)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for src, name in rows:
                data_dir = data_of.get(src)
                if name == "plain cl-fp32":
                    out = plain_compute(args)
                elif name.startswith("plain"):
                    out = plain_loop(args, data_dir)
                else:  # compute-only: tensors already in memory, no augmentation
                    precision = None if name.endswith("defaults") else name.split()[-1]
                    out = cnntrain_run(args, data_dir, precision, Path(tmp),
                                       "none" if name.startswith("compute") else "crop-flip")
                results[(src, name)].append(out)
                print(f"  repeat {rep + 1}/{args.repeats}  {src:10s} {name:18s} {out['img_per_s']:8.1f} img/s",
                      flush=True)

    med = {k: statistics.median(o["img_per_s"] for o in v) for k, v in results.items()}
    start = {k: statistics.median(o["startup_s"] for o in v) for k, v in results.items()}
    print(f"\n{args.model}, batch {args.batch_size}, {args.threads} threads, plain loop with {args.workers} "
          f"workers, {args.steps} timed steps, median of {args.repeats}; {machine_line()}")
    print(f"{'data':10s} {'loop':18s} {'img/s':>8s} {'vs plain':>9s} {'one-time s':>11s}")
    for src, name in rows:
        plain = med.get((src, "plain fp32"))
        ratio = f"{med[(src, name)] / plain:8.2f}x" if plain else f"{'':9s}"
        print(f"{src:10s} {name:18s} {med[(src, name)]:8.1f} {ratio} {start[(src, name)]:11.1f}")
    print()
    summary = {}
    for src, _ in sources:
        for prec in args.precisions:
            e2e = med[(src, f"cnntrain {prec}")] / med[("in memory", f"compute-only {prec}")]
            summary[f"{src} {prec} end-to-end / compute-only"] = e2e
            print(f"{src} cnntrain {prec}: end-to-end / compute-only = {e2e:.3f}")
    compute = med[("in memory", "plain cl-fp32")]
    for src, _ in sources:
        defaults = med[(src, "cnntrain defaults")]
        summary[f"{src} defaults / plain loop"] = defaults / med[(src, "plain fp32")]
        summary[f"{src} defaults / plain channels_last fp32 compute"] = defaults / compute
        print(f"{src} cnntrain defaults: {summary[f'{src} defaults / plain loop']:.2f}x the plain loop, "
              f"{summary[f'{src} defaults / plain channels_last fp32 compute']:.2f}x plain channels_last fp32 "
              f"compute alone")
    report = {"median_img_per_s": {f"{s} | {n}": v for (s, n), v in med.items()}, "ratios": summary,
              "machine": machine_line(), "args": vars(args)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
