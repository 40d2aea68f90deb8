"""Write an MNIST data dir from the official *test* files: the first N images as the training set and
the rest as the test set, in the official gzipped IDX format and file names.

Used for real-data checks where only the official test split is at hand:

    python benchmarks/mnist_from_test_split.py ../shared/data/mnist /tmp/mnist-split --train 8000
    cnntrain train --dataset mnist --data-dir /tmp/mnist-split --model lenet --epochs 2 --no-verify
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

from cnntrain.data.mnist import read_idx


def write_idx(path: Path, array) -> None:
    magic = 0x0800 | array.dim()
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--train", type=int, default=8000, help="images for the training set")
    args = parser.parse_args()
    images = read_idx(args.source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "t10k-labels-idx1-ubyte.gz")
    args.dest.mkdir(parents=True, exist_ok=True)
    n = args.train
    write_idx(args.dest / "train-images-idx3-ubyte.gz", images[:n])
    write_idx(args.dest / "train-labels-idx1-ubyte.gz", labels[:n])
    write_idx(args.dest / "t10k-images-idx3-ubyte.gz", images[n:])
    write_idx(args.dest / "t10k-labels-idx1-ubyte.gz", labels[n:])
    print(f"{args.dest}: {n} training and {len(labels) - n} test images")


if __name__ == "__main__":
    main()
