"""Small shared pieces for the tests: tiny configs and running the CLI in a subprocess."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def tiny(run_dir, **overrides) -> dict:
    """Options for a few-second CPU run on synthetic 1x28x28 data with LeNet, in fp32: ``--precision
    auto`` would pick bf16 on some CPUs and fp32 on others, and tests must not depend on the machine."""
    options = dict(dataset="synthetic", synthetic_shape=[1, 28, 28], synthetic_size=256, model="lenet",
                   epochs=2, batch_size=32, lr=0.1, display_every=4, run_dir=str(run_dir), progress="log",
                   threads=1, seed=1, precision="fp32")
    options.update(overrides)
    return options


def cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def run_cli(*args: str, timeout: float = 240, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cnntrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def same_weights(run_a, run_b) -> bool:
    """Both runs' model.safetensors hold the same tensors, bit for bit."""
    wa, wb = weights(run_a), weights(run_b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics_rows(run_dir, timed=("img_per_s", "elapsed_s")) -> list[dict]:
    """metrics.csv's rows without the columns that measure time (those differ between equal runs)."""
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in timed} for r in csv.DictReader(f)]
