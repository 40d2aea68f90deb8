"""Write an MNIST data dir from the official *test* files: the first N images as the training set and
the rest as the test set, in the official gzipped IDX format and file names.

Used for real-data checks where only the official test split is at hand:

    python benchmarks/mnist_from_test_split.py ../shared/data/mnist /tmp/mnist-split --train 8000
    cnntrain train --dataset mnist --data-dir /tmp/mnist-split --model lenet --epochs 2 --no-verify

It is cheap at any size (a few MB read and written), so it has no tiny mode: the tests run it on
generated IDX files.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnntrain.data.mnist import read_idx  # noqa: E402 - needs the path above


def write_idx(path: Path, array) -> None:
    magic = 0x0800 | array.dim()
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--train", type=int, default=8000, help="images for the training set")
    args = parser.parse_args(argv)
    images = read_idx(args.source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "t10k-labels-idx1-ubyte.gz")
    n = args.train
    if not 0 < n < len(labels):
        parser.error(f"--train must leave images for both sets: the source holds {len(labels)}")
    args.dest.mkdir(parents=True, exist_ok=True)
    write_idx(args.dest / "train-images-idx3-ubyte.gz", images[:n])
    write_idx(args.dest / "train-labels-idx1-ubyte.gz", labels[:n])
    write_idx(args.dest / "t10k-images-idx3-ubyte.gz", images[n:])
    write_idx(args.dest / "t10k-labels-idx1-ubyte.gz", labels[n:])
    print(f"{args.dest}: {n} training and {len(labels) - n} test images")


if __name__ == "__main__":
    main()
