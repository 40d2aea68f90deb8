"""Evaluation speed with BatchNorm folded into the convolutions (what ``evaluate`` does) against the
model as trained, side by side: img/s of scoring ``--images`` held-out-sized batches, rows in
rotation ``--repeats`` times, medians and the ratio, the time the folding itself takes (a traced copy,
once per evaluation) and the largest difference of the logits.

    python benchmarks/eval_fold.py --threads 2 --repeats 3
    python benchmarks/eval_fold.py --tiny         # checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cnntrain.engine.evaluate import folded_for_inference  # noqa: E402
from cnntrain.models import create_model, get_spec  # noqa: E402


def img_per_s(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "fastnet", "resnet18"])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.images, args.batch_size, args.repeats = ["resnet20"], 64, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"evaluation img/s, batch {args.batch_size}, {args.images} images of {args.image_size} px, "
          f"{torch.get_num_threads()} threads, channels_last fp32, medians of {args.repeats} rounds")
    print("| model | as trained | BN folded | folded / as trained | folding, ms | max logit difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        channels = get_spec(name).input_size[0]
        model = create_model(name, 10).to(memory_format=torch.channels_last)
        with torch.no_grad():  # BN statistics away from (0, 1), as after training
            model.train()
            for _ in range(2):
                model(torch.randn(64, channels, args.image_size, args.image_size) * 2 + 0.5)
        model.eval()
        start = time.perf_counter()
        folded = folded_for_inference(model)  # what every evaluation pays once
        fold_ms = 1000 * (time.perf_counter() - start)
        batches = [torch.randn(min(args.batch_size, args.images - i), channels, args.image_size, args.image_size)
                   .contiguous(memory_format=torch.channels_last) for i in range(0, args.images, args.batch_size)]
        img_per_s(model, batches[:1]), img_per_s(folded, batches[:1])  # warm-up: oneDNN primitives
        plain, fused = [], []
        for _ in range(args.repeats):
            plain.append(img_per_s(model, batches))
            fused.append(img_per_s(folded, batches))
        with torch.no_grad():
            diff = float((model(batches[0]) - folded(batches[0])).abs().max())
        p, f = statistics.median(plain), statistics.median(fused)
        print(f"| {name} | {p:,.0f} | {f:,.0f} | {f / p:.2f}x | {fold_ms:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
