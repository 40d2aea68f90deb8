"""Streamed JPEG input: decoding by the DataLoader workers (PIL) against decoding on the training
device (``--decode device``: nvJPEG on CUDA, libjpeg-turbo in the main process on CPU), side by side.

    python benchmarks/jpeg_decode.py --data-dir /data/hymenoptera --image-size 224 --workers 1
    python benchmarks/jpeg_decode.py --data-dir /data/imagenet --device cuda --batch-size 256 --workers 8
    python benchmarks/jpeg_decode.py --tiny         # a small generated folder, 2 batches a row: checks it runs

Each row is ``cnntrain bench --data-only`` (read, decode, crop, resize, flip, transfer, normalise:
the whole input pipeline and nothing else) in a fresh process, with the same folder, crop size,
batch size, workers and threads. Rows run ``--repeats`` times in rotation, so machine noise hits
both alike; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnntrain.bench import machine_line  # noqa: E402 - needs the path above


def measure(decode: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "cnntrain", "bench", "--data-only", "--data-dir", args.data_dir, "--decode", decode,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--workers", str(args.workers), "--threads", str(args.threads),
           "--device", args.device, "--json"]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["img_per_s"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="image folder with train/<class>/*.jpg (or <class>/*.jpg)")
    p.add_argument("--tiny", action="store_true", help="a generated folder of 48 small JPEGs, 1 repeat of 2 batches")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed batches per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="jpeg-decode-")
    if args.tiny:
        from tests.fixtures import write_image_folder

        write_image_folder(tmp.name, ("ants", "bees"), per_class=24, size=(90, 120))
        args.data_dir, args.image_size, args.batch_size, args.steps, args.warmup, args.repeats = \
            tmp.name, 64, 8, 2, 1, 1
    if not args.data_dir:
        p.error("--data-dir is required (or --tiny)")

    rates: dict[str, list[float]] = {"host": [], "device": []}
    with tmp:
        for _ in range(args.repeats):
            for decode in rates:
                rates[decode].append(measure(decode, args))
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if args.device != "cpu" and torch.cuda.is_available() else ""
    print(f"input pipeline alone on {args.data_dir}, {args.image_size} px crops, batch {args.batch_size}, "
          f"{args.workers} workers; {machine_line()}{gpu}")
    for decode, values in rates.items():
        print(f"  decode on {decode:6s}: {statistics.median(values):8.1f} img/s (median of "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(rates["device"]) / statistics.median(rates["host"])
    print(f"device / host: {ratio:.2f}x")
    return {"img_per_s": rates, "device_over_host": ratio}


if __name__ == "__main__":
    main()
