"""Class imbalance on real images: macro F1 on a balanced held-out set, trained without and with
``--class-weights auto`` and ``--balanced-sampler``.

    python benchmarks/imbalance_check.py --archive /work/shared/data/cifar10-jpeg-train.tar.gz \\
        --work /tmp/imbalance-cifar --epochs 6 --json imbalance.json
    python benchmarks/imbalance_check.py --tiny --json imbalance.json  # a generated archive: checks it runs

From the CIFAR-10 training JPEGs (``train/<class>/NNNN.jpg``) it builds an image folder: per class
``--val-per-class`` images held out as a balanced ``val/`` split, and ``--per-class`` training images
of which the ``--minority`` classes keep only ``--keep`` (10%). The same ResNet-20 recipe then
trains three times (``--threads 1``, same seed): plain, ``--class-weights auto``,
``--balanced-sampler``; each run's macro F1, top-1 and the minority classes' recall on the held-out
images come from its ``eval/metrics.json``. Files are hard links into ``--work``: nothing is copied
into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # --tiny writes its archive with tests/fixtures.py

VARIANTS = {"plain": [], "class-weights": ["--class-weights", "auto"], "balanced-sampler": ["--balanced-sampler"]}


def extract(archive: Path, work: Path) -> Path:
    """The archive's ``train/`` folder, extracted once into ``work/source``."""
    source = work / "source"
    if not (source / "train").is_dir():
        source.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(source, filter="data")
    return source / "train"


def build_folder(source: Path, root: Path, per_class: int, val_per_class: int, minority: list[str],
                 keep: float) -> dict[str, dict[str, int]]:
    """``root/{train,val}/<class>/`` as hard links; returns the image counts per split and class."""
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        if len(files) < per_class + val_per_class:
            raise SystemExit(f"{folder}: {len(files)} images, fewer than --per-class + --val-per-class")
        val, train = files[-val_per_class:], files[:per_class]  # the held-out images are never trained on
        if folder.name in minority:
            train = train[:max(1, round(keep * per_class))]
        for split, chosen in (("train", train), ("val", val)):
            dest = root / split / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                if not (dest / f.name).exists():
                    os.link(f, dest / f.name)
            counts[split][folder.name] = len(chosen)
    return counts


def train(root: Path, run_dir: Path, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "cnntrain", "train", "--dataset", "folder", "--data-dir", str(root),
           "--model", "resnet20", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", "0.1",
           "--weight-decay", "5e-4", "--lr-schedule", "cosine", "--threads", str(args.threads), "--seed", "0",
           "--precision", "fp32", "--progress", "log", "--display-every", "100", "--run-dir", str(run_dir),
           "--overwrite", "--cache-dir", str(args.work / "cache"), *extra]
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"command": " ".join(cmd[1:]), "seconds": time.time() - started, "macro_f1": report["macro_f1"],
            "weighted_f1": report["weighted_f1"], "top1": report["top1"], "ece": report["ece"],
            "minority_recall": {c: report["per_class"][c]["recall"] for c in args.minority},
            "minority_f1": {c: report["per_class"][c]["f1"] for c in args.minority}}


def tiny_archive(root: Path) -> Path:
    """A small stand-in for the CIFAR-10 JPEG archive: ``train/<class>/NNNN.jpg``, 4 classes of 16."""
    from tests.fixtures import write_image_folder

    write_image_folder(root / "cifar", ("airplane", "bird", "cat", "dog"), per_class=16)
    with tarfile.open(root / "cifar.tar.gz", "w:gz") as tar:
        tar.add(root / "cifar" / "train", arcname="train")
    return root / "cifar.tar.gz"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=Path("/work/shared/data/cifar10-jpeg-train.tar.gz"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/imbalance-cifar"))
    parser.add_argument("--per-class", type=int, default=1500, help="training images of a majority class")
    parser.add_argument("--val-per-class", type=int, default=500, help="held-out images per class")
    parser.add_argument("--minority", nargs="+", default=["bird", "cat", "deer"])
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of --per-class the minority keeps")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="a generated 64-image archive, 1 epoch of batch 8")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="imbalance-")
    if args.tiny:
        args.archive, args.work = tiny_archive(Path(tmp.name)), Path(tmp.name) / "work"
        args.per_class, args.val_per_class, args.minority, args.keep = 12, 4, ["bird", "cat"], 0.25
        args.epochs, args.batch_size = 1, 8
    source = extract(args.archive, args.work)
    root = args.work / f"folder-{args.per_class}-{args.val_per_class}-{args.keep:g}-{'-'.join(args.minority)}"
    counts = build_folder(source, root, args.per_class, args.val_per_class, args.minority, args.keep)
    print(f"{root}: train {counts['train']}\n  val {counts['val']}", flush=True)
    results = {}
    for name in args.variants:
        results[name] = train(root, args.work / "runs" / name, VARIANTS[name], args)
        r = results[name]
        recalls = ", ".join(f"{c} {100 * v:.1f}%" for c, v in r["minority_recall"].items())
        print(f"{name:<17} macro F1 {100 * r['macro_f1']:.2f}%  top-1 {100 * r['top1']:.2f}%  minority recall "
              f"{recalls}  ({r['seconds']:.0f} s)", flush=True)
    out = {"counts": counts, "epochs": args.epochs, "results": results, "machine": platform.processor() or
           platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
