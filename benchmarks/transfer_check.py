"""Transfer learning on real photos: does a start from CIFAR-10 weights beat random weights on the
ants/bees photos, and how much faster is an epoch with the backbone frozen?

    python benchmarks/transfer_check.py --cifar /data/cifar10-jpeg --photos /data/hymenoptera_data --out transfer
    python benchmarks/transfer_check.py --photos /data/hymenoptera_data --out transfer --speed-only   # ~2 min
    python benchmarks/transfer_check.py --tiny --out /tmp/transfer   # generated folders, 1 epoch: checks it runs

1. ResNet-18 trained on a class-balanced subset of the CIFAR-10 training JPEGs (``--cifar``, a folder
   of ``train/<class>/*.jpg``; symlinked into ``<out>/cifar-subset``), upsampled to ``--size`` pixels.
2. The same ResNet-18 fine-tuned on the ants/bees photos (``--photos``: ``train/`` and the held-out
   ``val/``) at the same size, from (1) with ``--init-from`` and from random weights, over
   ``--seeds`` seeds each: the mean held-out top-1 of each and their difference.
3. Seconds per epoch of ``--freeze backbone`` against full fine-tuning at ``--speed-size`` pixels,
   runs of the two alternating (so that a change of load hits both alike), the last epoch of each
   run timed (the training window's img/s, evaluation excluded): the median of each and their ratio.

Every run is ``cnntrain train`` in a fresh process, printed before it starts.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnntrain.bench import machine_line  # noqa: E402 - needs the path above


def train(run_dir: Path, args: argparse.Namespace, *options: str) -> dict:
    cmd = [sys.executable, "-m", "cnntrain", "train", "--model", "resnet18", "--run-dir", str(run_dir),
           "--overwrite", "--progress", "log", "--threads", str(args.threads), "--precision", "fp32",
           "--cache-dir", str(Path(args.out) / "cache"), "--display-every", "100000", *options]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())


def cifar_subset(src: Path, dest: Path, per_class: int) -> Path:
    """``dest/train/<class>/`` holding symlinks to the first ``per_class`` images of each class."""
    for folder in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        out = dest / "train" / folder.name
        out.mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir())[:per_class]:
            link = out / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return dest


def pretrain(args: argparse.Namespace) -> Path:
    run_dir = Path(args.out) / "cifar-resnet18"
    if args.reuse and (run_dir / "model.safetensors").is_file():
        s = json.loads((run_dir / "summary.json").read_text())
        print(f"reusing {run_dir}: held-out top-1 {100 * s['final_top1']:.1f}%", flush=True)
        return run_dir
    data = cifar_subset(Path(args.cifar), Path(args.out) / "cifar-subset", args.per_class)
    s = train(run_dir, args, "--dataset", "folder", "--data-dir", str(data), "--pipeline", "memory",
              "--image-size", str(args.size), "--val-split", str(args.cifar_val), "--epochs", str(args.cifar_epochs),
              "--batch-size", "128", "--lr", "0.1", "--warmup-epochs", "0.2", "--weight-decay", "5e-4")
    images = len(list(data.glob("train/*/*")))
    print(f"CIFAR-10 subset ({images} images, {args.size} px, {args.cifar_epochs} epochs): held-out "
          f"top-1 {100 * s['final_top1']:.1f}% in {s['train_seconds']:.0f} s", flush=True)
    return run_dir


def finetune(args: argparse.Namespace, source: Path | None, seed: int) -> float:
    name = f"ants-bees-{'cifar' if source else 'random'}-seed{seed}"
    start = ["--init-from", str(source)] if source else []
    s = train(Path(args.out) / name, args, "--dataset", "folder", "--data-dir", args.photos, "--pipeline", "memory",
              "--image-size", str(args.size), "--epochs", str(args.finetune_epochs), "--batch-size", "16",
              "--lr", "0.01", "--weight-decay", "1e-4", "--seed", str(seed), *start)
    return 100 * s["final_top1"]


def last_epoch_seconds(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    images = json.loads((run_dir / "summary.json").read_text())["global_batch"] * (int(rows[-1]["step"]) -
                                                                                 int(rows[-2]["step"]))
    return images / float(rows[-1]["img_per_s"])


def speed(args: argparse.Namespace) -> tuple[float, float]:
    times: dict[str, list[float]] = {"freeze": [], "full": []}
    for r in range(args.rounds):
        for mode in ("freeze", "full"):
            run_dir = Path(args.out) / f"speed-{mode}-{r}"
            extra = ["--freeze", "backbone"] if mode == "freeze" else []
            train(run_dir, args, "--dataset", "folder", "--data-dir", args.photos, "--pipeline", "memory",
                  "--image-size", str(args.speed_size), "--epochs", "2", "--batch-size", "32", "--lr", "0.01",
                  "--augment", "flip", "--drop-last", *extra)
            times[mode].append(last_epoch_seconds(run_dir))
            print(f"round {r}: {mode} {times[mode][-1]:.2f} s/epoch", flush=True)
    return statistics.median(times["freeze"]), statistics.median(times["full"])


def tiny_folders(root: Path) -> tuple[str, str]:
    """Small stand-ins: 4 classes of 36 CIFAR-sized JPEGs, and ants / bees photos with a val/ split."""
    from tests.fixtures import write_image_folder

    write_image_folder(root / "cifar", ("airplane", "bird", "cat", "dog"), per_class=36)
    write_image_folder(root / "photos", ("ants", "bees"), per_class=20, size=(40, 48))
    write_image_folder(root / "photos", ("ants", "bees"), per_class=4, size=(40, 48), split="val", seed=1)
    return str(root / "cifar"), str(root / "photos")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", help="folder with train/<class>/*.jpg (the CIFAR-10 training JPEGs)")
    p.add_argument("--photos", help="hymenoptera_data: train/ and val/ of ants and bees")
    p.add_argument("--out", default="transfer")
    p.add_argument("--per-class", type=int, default=2000, help="CIFAR-10 images per class")
    p.add_argument("--cifar-val", type=int, default=1000, help="CIFAR-10 images held out of pre-training")
    p.add_argument("--size", type=int, default=64, help="image side for pre-training and fine-tuning (pixels)")
    p.add_argument("--cifar-epochs", type=float, default=3)
    p.add_argument("--finetune-epochs", type=float, default=15)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--speed-size", type=int, default=160, help="image side of the speed runs (pixels)")
    p.add_argument("--rounds", type=int, default=3, help="alternating freeze / full runs each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-only", action="store_true", help="only part 3 (no CIFAR-10 needed)")
    p.add_argument("--reuse", action="store_true", help="keep <out>/cifar-resnet18 when it is complete")
    p.add_argument("--no-speed", action="store_true", help="skip part 3")
    p.add_argument("--tiny", action="store_true", help="generated folders, 32 px, 1 epoch, 1 seed, 1 round")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="transfer-check-")
    if args.tiny:
        args.cifar, args.photos = tiny_folders(Path(tmp.name))
        args.per_class, args.cifar_val, args.size, args.speed_size = 36, 16, 32, 32
        args.cifar_epochs, args.finetune_epochs, args.seeds, args.rounds = 1, 1, 1, 1
    if not args.photos:
        p.error("--photos is required (or --tiny)")
    print(machine_line(), flush=True)
    figures: dict = {}
    started = time.perf_counter()
    if not args.speed_only:
        if not args.cifar:
            p.error("--cifar is needed unless --speed-only")
        source = pretrain(args)
        cifar = [finetune(args, source, seed) for seed in range(args.seeds)]
        scratch = [finetune(args, None, seed) for seed in range(args.seeds)]
        print(f"ants/bees held-out top-1 over {args.seeds} seeds: from CIFAR-10 weights "
              f"{statistics.mean(cifar):.1f}% ({', '.join(f'{a:.1f}' for a in cifar)}), from random weights "
              f"{statistics.mean(scratch):.1f}% ({', '.join(f'{a:.1f}' for a in scratch)}): "
              f"{statistics.mean(cifar) - statistics.mean(scratch):+.1f} points", flush=True)
        figures.update(from_cifar_top1=cifar, from_random_top1=scratch)
    if not args.no_speed:
        frozen, full = speed(args)
        print(f"seconds per epoch at {args.speed_size} px (median of {args.rounds}): --freeze backbone {frozen:.2f}, "
              f"full fine-tuning {full:.2f}: {full / frozen:.2f}x faster frozen", flush=True)
        figures.update(frozen_s_per_epoch=frozen, full_s_per_epoch=full)
    print(f"total {time.perf_counter() - started:.0f} s")
    tmp.cleanup()
    return figures


if __name__ == "__main__":
    main()
