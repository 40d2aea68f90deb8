"""Start-up time of a training run on an image folder: the wall time of a 1-step run in a fresh
process (imports, listing, the decoded-image cache, model, one step, the evaluation of the held-out
images, plots and reports), the first time (cache empty) and the next times (cache mapped), beside
the time to import cnntrain alone.

    mkdir -p /tmp/su && tar -xzf /work/shared/data/cifar10-jpeg-train.tar.gz -C /tmp/su
    python benchmarks/startup.py --data-dir /tmp/su --repeats 3 --cold
    python benchmarks/startup.py --tiny          # a small generated folder: checks that it runs

The runs use a cache folder of their own, filled by a first run (timed with ``--cold``), so the
user's cache is never touched. ``--code A B`` times several checkouts in rotation, e.g. a worktree of
an older commit beside this one (``git worktree add /tmp/old <commit>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    # Not in the repository: the current folder comes first on sys.path and would shadow --code.
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def make_tiny_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(60):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="a folder with train/<class>/<image>")
    parser.add_argument("--val-split", type=int, default=5000)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also time a first run with an empty cache")
    parser.add_argument("--tiny", action="store_true", help="a generated 180-image folder, 1 repeat")
    parser.add_argument("--code", nargs="+", default=[str(REPO)],
                        help="cnntrain checkouts to time, in rotation (e.g. another commit's worktree beside this "
                             "one); default: this one")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cnntrain-startup-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            make_tiny_folder(tmp / "data")
            args.data_dir, args.val_split, args.repeats = str(tmp / "data"), 20, 1
        if not args.data_dir:
            parser.error("--data-dir is required (or --tiny)")
        data_dir = str(Path(args.data_dir).resolve())
        codes = [str(Path(c).resolve()) for c in args.code]
        envs = {c: dict(os.environ, CNNTRAIN_CACHE=str(tmp / "cache"), PYTHONPATH=c) for c in codes}
        run = [sys.executable, "-m", "cnntrain", "train", "--dataset", "folder", "--data-dir", data_dir,
               "--val-split", str(args.val_split), "-n", args.model, "--max-steps", "1", "--seed", "0",
               *(["--batch-size", "32"] if args.tiny else [])]
        # The cache format is shared, so the first checkout's first run fills it for all of them.
        first = timed([*run, "--run-dir", str(tmp / "first")], envs[codes[0]], tmp)
        figures: dict = {"model": args.model, "data_dir": data_dir, "codes": {}}
        if args.cold:
            figures["cold_s"] = first
        timings = {c: {"import_s": [], "warm_s": []} for c in codes}
        for i in range(args.repeats):  # in rotation, so machine noise hits every row alike
            for k, c in enumerate(codes):
                timings[c]["import_s"].append(timed([sys.executable, "-c", "import cnntrain.cli"], envs[c], tmp))
                timings[c]["warm_s"].append(timed([*run, "--run-dir", str(tmp / f"warm{i}-{k}")], envs[c], tmp))
        for c, t in timings.items():
            figures["codes"][c] = dict(t, import_median_s=statistics.median(t["import_s"]),
                                       warm_median_s=statistics.median(t["warm_s"]))

    print(f"1-step run of {args.model} on {data_dir} (held out: {args.val_split}), wall seconds")
    print("| code | run | seconds | median |\n|---|---|---|---:|")
    if "cold_s" in figures:
        print(f"| {codes[0]} | first (cache empty) | {figures['cold_s']:.2f} | |")
    for c, f in figures["codes"].items():
        warm = ", ".join(f"{s:.2f}" for s in f["warm_s"])
        print(f"| {c} | next (cache mapped) | {warm} | {f['warm_median_s']:.2f} |")
        print(f"| {c} | `import cnntrain.cli` alone | {', '.join(f'{s:.2f}' for s in f['import_s'])} | "
              f"{f['import_median_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
