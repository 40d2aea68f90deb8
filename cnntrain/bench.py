"""``cnntrain bench``: training throughput of one model, or of the input pipeline alone.

    cnntrain bench --model resnet50 --synthetic --batch-size 32 --steps 10 --warmup 3
    cnntrain bench --model resnet50 --synthetic --precision bf16 --json
    cnntrain bench --model resnet50 --synthetic --precision auto   # what training would pick here
    cnntrain bench --data-only --data-dir photos/ --batch-size 32 --steps 20     # decoded img/s

Each timed step is split into data wait / forward / backward / optimizer. On CUDA the device is
synchronised at each phase boundary, so the split is exact but the total is slightly pessimistic
(no overlap of host and device work). img/s is images per mean step time +- its standard
error; the warm-up steps (allocator, cuDNN autotuning, page faults, ``compile=True``'s compilation)
are not timed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cnntrain.config import build_config
from cnntrain.data.folder import find_split
from cnntrain.data.streaming import IMAGENET_STATS, StreamLoader, balance_threads, default_workers, folder_dataset
from cnntrain.engine.optim import build_optimizer
from cnntrain.engine.precision import LossScaler
from cnntrain.engine.profile import NoProfiler
from cnntrain.engine.step import LocalUpdate, StepParts, make_loss_fn, train_step
from cnntrain.errors import ConfigError
from cnntrain.hardware import peak_memory_mb, pick_device, resolve_precision
from cnntrain.models import create_model, get_spec
from cnntrain.parallel.base import SingleProcess
from cnntrain.parallel.env import LaunchEnv

PHASES = ("data", "forward", "backward", "optimizer")  # the engine's exchange phase counts as optimizer


@dataclass
class BenchResult:
    model: str
    batch_size: int
    precision: str
    device: str
    steps: int
    img_per_s: float  # mean batch / mean step time over the timed steps
    img_per_s_stderr: float  # its standard error
    phase_ms: dict[str, float] = field(default_factory=dict)  # mean milliseconds per step, by phase
    peak_memory_mb: float = 0.0  # CUDA: max allocated; CPU: peak resident set of the process
    threads: int = 0
    workers: int = 0
    data: str = "synthetic"
    torch_version: str = torch.__version__
    channels_last: bool = True
    compiled: bool = False  # the model ran through torch.compile
    image_size: int = 0  # pixels (square)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def describe(self) -> str:
        what = "input pipeline only" if self.model == "-" else f"{self.model} {self.precision}" + \
            (", channels_last" if self.channels_last else "") + (", compiled" if self.compiled else "")
        lines = [f"{what} on {self.device} ({self.data}), batch {self.batch_size}, {self.steps} timed steps, "
                 f"{self.threads} threads, {self.workers} workers, torch {self.torch_version}",
                 f"throughput  {self.img_per_s:.1f} +- {self.img_per_s_stderr:.1f} img/s (+- s.e.)"]
        total = sum(self.phase_ms.values())
        if total:
            split = " | ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in self.phase_ms.items())
            lines.append(f"step {total:.1f} ms: {split}")
        lines.append(f"peak memory {self.peak_memory_mb:.0f} MiB")
        return "\n".join(lines)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _rate(counts: list[int], seconds: list[float]) -> tuple[float, float]:
    """Images per second as mean batch / mean step time, +- its standard error (propagated from the
    time's). nvcnn averages per-step rates instead; that overstates throughput when a few steps are
    fast (prefetched batches, a momentarily idle shared machine), since the mean of 1/t exceeds 1/mean t."""
    t_mean, t_err = _mean_stderr(seconds)
    rate = sum(counts) / len(counts) / t_mean
    return rate, rate * t_err / t_mean


def _stream_loader(data_dir: str, size: int, batch_size: int, device: torch.device, workers: int,
                   decode: str = "host"):
    root = Path(data_dir)
    split = root / "train" if (root / "train").is_dir() else root / (find_split(root) or "")
    data = folder_dataset(split, size)
    data.decode = decode
    workers = workers if workers >= 0 else default_workers(device.type)
    balance_threads(workers, 0)
    mean, std = IMAGENET_STATS
    return StreamLoader(data, batch_size, device=device, mean=mean, std=std, shuffle=True, workers=workers), workers


def _batches(loader):
    epoch = 0
    while True:
        yield from loader.iterate(epoch)
        epoch += 1


class _PhaseClock(NoProfiler):
    """Milliseconds per phase of each step, the device synchronised at each phase boundary."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.current: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            key = "optimizer" if name == "communication" else name  # one process: nothing is exchanged
            self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - started


def bench(model: str = "resnet50", *, batch_size: int = 32, steps: int = 10, warmup: int = 3,
          precision: str = "fp32", data_dir: str | None = None, data_only: bool = False, device: str = "auto",
          image_size: int = 0, workers: int = -1, threads: int = 0, channels_last: bool = True,
          num_classes: int = 1000, decode: str = "host", compile: bool = False) -> BenchResult:
    """Time ``steps`` training steps (after ``warmup`` untimed ones) of ``model`` on synthetic data
    (``data_dir=None``) or on the folder ``data_dir`` (streamed); ``data_only`` times the input
    pipeline alone (decode + crop + flip + transfer; ``decode="device"``: JPEGs decoded on the device).

    The step is the engine's ``train_step`` with the optimizer, loss scaling and skip rule that
    ``cnntrain train`` builds from the same options (SGD, momentum 0.9, weight decay 5e-4).
    ``precision="auto"`` is resolved for the device as training resolves it (the result names the
    choice); ``compile`` runs the model through ``torch.compile`` as ``--compile`` does (compiled
    during the warm-up steps: give a few)."""
    if steps < 2:
        raise ConfigError("--steps must be at least 2 to give a standard error")
    if data_only and not data_dir:
        raise ConfigError("--data-only needs --data-dir (a folder of images)")
    cfg = build_config(dataset="synthetic", model=model, batch_size=batch_size, precision=precision, device=device,
                       threads=threads, channels_last=channels_last, compile=compile)
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(cfg.device)
    precision, _ = resolve_precision(cfg.precision, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.backends.cudnn.benchmark = True  # as training runs without --deterministic
    size = image_size or (get_spec(model).input_size[1] if not data_only else 224)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    loader, used_workers = (_stream_loader(data_dir, size, batch_size, dev, workers, decode) if data_dir
                            else (None, 0))
    source = f"folder {data_dir}{', JPEGs decoded on the device' if decode == 'device' else ''}" if data_dir \
        else "synthetic"
    if data_only:
        rate, err, times = _time_batches(_batches(loader), warmup, steps, sync)
        return BenchResult("-", batch_size, "-", str(dev), steps, rate, err, {"data": 1000 * sum(times) / steps},
                           peak_memory_mb(dev), torch.get_num_threads(), used_workers, source, image_size=size)
    net = create_model(model, num_classes).to(dev).train()
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    clock = _PhaseClock(sync)
    optimizer = build_optimizer(net, cfg, dev.type)
    forward = torch.compile(net) if compile else net  # as the trainer does with --compile
    parts = StepParts(forward, [p for p in net.parameters() if p.requires_grad], make_loss_fn(),
                      LossScaler.for_precision(precision), SingleProcess(cfg, LaunchEnv()),
                      LocalUpdate(optimizer, net), precision, profiler=clock)
    batches = _batches(loader) if loader is not None else itertools.repeat(
        _fixed_batch(get_spec(model).input_size[0], size, batch_size, num_classes, dev, channels_last))
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    counts, totals = [], []
    for i in range(warmup + steps):
        clock.current = {}
        started = time.perf_counter()
        outcome = train_step(parts, batches, cfg.lr, i)
        total = time.perf_counter() - started
        if i >= warmup:
            for name in PHASES:
                phases[name].append(clock.current.get(name, 0.0))
            counts.append(outcome.images)
            totals.append(total)
    rate, err = _rate(counts, totals)
    phase_ms = {k: 1000 * sum(v) / len(v) for k, v in phases.items()}
    return BenchResult(model, batch_size, precision, str(dev), steps, rate, err, phase_ms, peak_memory_mb(dev),
                       torch.get_num_threads(), used_workers, source, channels_last=channels_last, compiled=compile,
                       image_size=size)


def _fixed_batch(channels: int, size: int, batch_size: int, num_classes: int, device: torch.device,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, channels, size, size, generator=g)
    return (images.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format),
            torch.randint(0, num_classes, (batch_size,), generator=g).to(device))


def _time_batches(batches, warmup: int, steps: int, sync) -> tuple[float, float, list[float]]:
    counts, times = [], []
    for i in range(warmup + steps):
        started = time.perf_counter()
        images, _ = next(batches)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
            counts.append(images.shape[0])
    rate, err = _rate(counts, times)
    return rate, err, times


def machine_line() -> str:
    """CPU model, cores and torch version, for BENCHMARKS.md rows."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
