"""The cost of each augmentation policy in the input pipeline: img/s of the training batches (read,
decode, crop, flip, policy, normalise, erase / mix) on an in-memory set and a streamed one, side by
side with no policy, as a table with ratios.

    mkdir -p /tmp/aug/cifar10 && tar -xzf /work/shared/data/cifar10-jpeg-train.tar.gz -C /tmp/aug/cifar10 \\
        && tar -xf /work/shared/data/hymenoptera.tar -C /tmp/aug
    python benchmarks/augment_policies.py --memory-dir /tmp/aug/cifar10 \\
        --stream-dir /tmp/aug/hymenoptera_data --threads 1 --workers 1
    python benchmarks/augment_policies.py --tiny        # a few steps on small generated folders: checks it runs

The in-memory set is held as uint8 on the device and augmented there (``--pipeline memory``: the
policy per image, erasing per image, mixing per batch); the streamed set is decoded, cropped to
``--image-size`` and given the policy in ``--workers`` DataLoader workers (``--pipeline stream``).
Each row times ``--steps`` batches after ``--warmup``, rows in rotation ``--repeats`` times (machine
noise hits every row alike), and reports the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cnntrain.bench import machine_line  # noqa: E402 - needs the path above
from cnntrain.config import build_config  # noqa: E402
from cnntrain.data.datasets import load_data  # noqa: E402
from cnntrain.data.loaders import build_loaders  # noqa: E402

ROWS = {  # row name -> the options it adds to the baseline
    "none": {},
    "randaugment": dict(auto_augment="randaugment"),
    "trivialaugment": dict(auto_augment="trivialaugment"),
    "autoaugment-imagenet": dict(auto_augment="autoaugment-imagenet"),
    "autoaugment-cifar10": dict(auto_augment="autoaugment-cifar10"),
    "augmix": dict(auto_augment="augmix"),
    "random-erase 0.25": dict(random_erase=0.25),
    "mixup 0.8 / cutmix 1.0": dict(mixup=0.8, cutmix=1.0),
    "timm-style (ra + erase + mix)": dict(auto_augment="randaugment", random_erase=0.25, mixup=0.8, cutmix=1.0),
}


def rate(bundle, options: dict, args: argparse.Namespace, pipeline: str) -> float:
    """Training-batch img/s of ``bundle`` with ``options``."""
    cfg = build_config(dataset="folder", model="resnet20", batch_size=args.batch_size, workers=args.workers,
                       threads=args.threads, seed=0, pipeline=pipeline, **options)
    loader, _ = build_loaders(cfg, bundle, torch.device(args.device))
    epoch, count, started = 0, 0, None
    while True:
        for step, (images, _) in enumerate(loader.iterate(epoch)):
            if step + epoch * len(loader) == args.warmup:
                count, started = 0, time.perf_counter()
            count += len(images)
            if started is not None and step + epoch * len(loader) >= args.warmup + args.steps - 1:
                if images.device.type == "cuda":
                    torch.cuda.synchronize()
                return count / (time.perf_counter() - started)
        epoch += 1


def load(data_dir: str, pipeline: str, image_size: int):
    cfg = build_config(dataset="folder", data_dir=data_dir, pipeline=pipeline, image_size=image_size,
                       model="resnet20", cache=pipeline == "memory")
    return load_data(cfg)


def tiny_folders(root: Path) -> tuple[str, str]:
    """Small generated stand-ins for the two sets: 32 px JPEGs (in memory) and photos (streamed)."""
    from tests.fixtures import write_image_folder

    write_image_folder(root / "memory", [f"c{k}" for k in range(10)], per_class=20, size=(32, 32))
    write_image_folder(root / "stream", ("ants", "bees"), per_class=24, size=(120, 90))
    return str(root / "memory"), str(root / "stream")


def main(argv: list[str] | None = None) -> dict[tuple[str, str], float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-dir", help="folder with train/<class>/*.jpg held in memory (CIFAR-10 JPEGs)")
    p.add_argument("--stream-dir", help="folder with train/<class>/*.jpg streamed (ants / bees photos)")
    p.add_argument("--tiny", action="store_true", help="generated small folders and few steps: checks it runs")
    p.add_argument("--image-size", type=int, default=224, help="streamed crop side (px)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed batches per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for the streamed set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", nargs="*", default=list(ROWS), help="rows to run (default: all)")
    args = p.parse_args(argv)
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        args.memory_dir, args.stream_dir = tiny_folders(Path(tmp.name))
        args.batch_size, args.steps, args.warmup, args.repeats, args.image_size = 16, 2, 1, 1, 64
    if not (args.memory_dir or args.stream_dir):
        p.error("give --memory-dir and / or --stream-dir (or --tiny)")
    torch.set_num_threads(args.threads)
    sets = {}
    if args.memory_dir:
        sets["memory"] = load(args.memory_dir, "memory", 0)
    if args.stream_dir:
        sets["stream"] = load(args.stream_dir, "stream", args.image_size)
    rates: dict[tuple[str, str], list[float]] = {(row, kind): [] for row in args.rows for kind in sets}
    for _ in range(args.repeats):
        for row in args.rows:
            for kind, bundle in sets.items():
                rates[row, kind].append(rate(bundle, ROWS[row], args, kind))
    medians = {key: statistics.median(values) for key, values in rates.items()}
    print(f"training input pipeline, batch {args.batch_size}, {args.threads} thread(s), {args.workers} worker(s) "
          f"for the streamed set, {args.image_size} px crops; median of {args.repeats}; {machine_line()}")
    for kind, bundle in sets.items():
        where = args.memory_dir if kind == "memory" else args.stream_dir
        print(f"  {kind}: {len(bundle.train)} images of {bundle.shape} ({where})")
    header = f"| {'policy':30s} |" + "".join(f" {kind + ' img/s':>14s} | {'x none':>6s} |" for kind in sets)
    print(header)
    print("|" + "---|" * (1 + 2 * len(sets)))
    for row in args.rows:
        cells = "".join(f" {medians[row, kind]:14.1f} | {medians[row, kind] / medians['none', kind]:6.2f} |"
                        if ("none", kind) in medians else f" {medians[row, kind]:14.1f} | {'':6s} |" for kind in sets)
        print(f"| {row:30s} |{cells}")
    if tmp is not None:
        tmp.cleanup()
    return medians


if __name__ == "__main__":
    main()
