"""Facts about this machine that every layer needs: usable cores, the training device, what it computes
natively (``--precision auto``), peak memory."""

from __future__ import annotations

import functools
import logging
import os
import resource
import time
from pathlib import Path

import torch

from cnntrain.config import TrainConfig
from cnntrain.errors import ConfigError

log = logging.getLogger("cnntrain")
PRECISIONS = ("fp32", "fp16", "bf16")  # what autocast, the loss scaler and evaluation accept
CPU_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}  # /proc/cpuinfo flags: bf16 in hardware


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``--device`` (auto | cpu | cuda) as a torch device; auto takes CUDA when there is one. On a
    node with several GPUs local rank ``r`` takes GPU ``r`` (modulo their number)."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise ConfigError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    return torch.device("cpu")


def cpu_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The name of this CPU's native bf16 instructions (AVX512-BF16 or AMX-BF16), or None.

    Read from the ``flags`` of ``/proc/cpuinfo`` (Linux; ``cpuinfo`` gives that text instead).
    ``torch.backends.cpu.get_cpu_capability()`` only says AVX512, which many CPUs without bf16
    arithmetic also report; without /proc/cpuinfo the answer is None (fp32 is the safe choice)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    # AMX first: where both exist, the tiles are what oneDNN's bf16 convolutions use.
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return CPU_BF16_FLAGS[flag]
    return None


BF16_MIN_SPEEDUP = 1.1  # auto takes bf16 on a CPU only when its convolutions are at least this much faster


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(rounds: int = 5) -> float:
    """How much faster a 3x3 convolution's forward and backward (64 channels, 16x16, batch 32,
    channels_last: a ResNet-20-sized layer) run under bf16 autocast than in fp32 on one core of this
    CPU, about 0.3 s, measured once per process. The two precisions alternate after a warm-up of
    each, and each keeps its fastest time: other processes on a shared machine only ever add time,
    and they would sway a comparison of two blocks measured one after the other."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(32, 64, 16, 16).to(memory_format=torch.channels_last).requires_grad_()

    def seconds(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        torch.autograd.grad(out.float().sum(), [x, conv.weight])  # a measurement: no .grad is kept
        return time.perf_counter() - started

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's speed: a parallel region stalls whenever a busy machine
    try:  # deschedules any of its threads, which made 2-thread probes read 0.4x-1.7x on one machine
        seconds(False), seconds(True)  # warm-ups: oneDNN picks and caches its kernels
        fp32, bf16 = float("inf"), float("inf")
        for _ in range(rounds):
            fp32, bf16 = min(fp32, seconds(False)), min(bf16, seconds(True))
    finally:
        torch.set_num_threads(threads)
    return fp32 / bf16


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """``--precision`` as fp32 | fp16 | bf16 for ``device``, and why, in a few words.

    fp32 / fp16 / bf16 are kept as given. ``auto``: bf16 where the device computes it natively
    (CUDA compute capability >= 8.0; a CPU with AVX512-BF16 or AMX), fp16 with dynamic loss scaling
    on older CUDA GPUs with tensor cores (compute capability 7.x), fp32 elsewhere."""
    if requested in PRECISIONS:
        return requested, "as asked"
    if requested != "auto":
        raise ConfigError(f"--precision {requested!r} is not one of auto, {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"CUDA compute capability {major}.{minor}"
        if major >= 8:
            return "bf16", f"{where} computes bf16 natively"
        if major >= 7:
            return "fp16", f"{where}: tensor cores take fp16, not bf16; dynamic loss scaling"
        return "fp32", f"{where} has no tensor cores"
    if device.type == "cpu":
        feature = cpu_bf16_feature()
        if not feature:
            return "fp32", "CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than fp32"
        # The flag says bf16 is native, not that it pays: on some AVX512-BF16 CPUs oneDNN's bf16
        # convolutions are slower than fp32 ones (0.76x for ResNet-20 on one Xeon here), so measure.
        speedup = cpu_bf16_speedup()
        if speedup >= BF16_MIN_SPEEDUP:
            return "bf16", f"CPU has {feature}; a bf16 convolution step measured {speedup:.2f}x fp32's speed"
        return "fp32", f"CPU has {feature}, but a bf16 convolution step measured only {speedup:.2f}x fp32's speed"
    return "fp32", f"no native bf16 or fp16 rule for device {device.type}"


def with_resolved_precision(cfg: TrainConfig, device: torch.device, announce: bool = True) -> TrainConfig:
    """``cfg`` with ``--precision auto`` replaced by what ``device`` runs best (``cfg`` itself when
    the precision was given), logging the choice and its reason once when ``announce``.

    A given ``--loss-scale`` is allowed with auto only when auto picks fp16; with
    ``--grad-compression topk|threshold`` auto never picks fp16 (its changing loss scale would
    corrupt the unsent remainders), fp32 then."""
    if cfg.precision != "auto":
        return cfg
    precision, reason = resolve_precision("auto", device)
    if precision == "fp16" and cfg.grad_compression in ("topk", "threshold"):
        precision, reason = "fp32", f"fp16 would suit this device, but --grad-compression {cfg.grad_compression} " \
                                    f"keeps unsent gradients across fp16's changing loss scale"
    if cfg.loss_scale and precision != "fp16":
        raise ConfigError(f"--loss-scale {cfg.loss_scale:g} applies to fp16 only, and --precision auto chose "
                          f"{precision} on {device} ({reason}): drop --loss-scale, or give --precision fp16")
    if announce:
        log.info("precision auto -> %s (%s)", precision, reason)
    return cfg.replace(precision=precision)


def agree_on_precision(cfg: TrainConfig, strategy) -> TrainConfig:
    """``cfg`` with ``--precision auto`` resolved for this rank's device (``cfg`` itself otherwise);
    ``strategy``: the run's, after its ``setup()`` (this is a collective in a group).

    In a group every rank takes rank 0's choice: the CPU rule is a timing, which two busy ranks can
    read differently, and GPUs of two generations choose differently; ranks computing in different
    precisions would no longer train one model alike. A rank whose own choice differed says so. A
    choice rank 0 refuses (``--loss-scale`` without fp16) fails on every rank instead of leaving the
    others waiting in the broadcast."""
    if cfg.precision != "auto":
        return cfg
    mine: TrainConfig | ConfigError
    try:
        mine = with_resolved_precision(cfg, strategy.device, announce=strategy.is_main)
        code = PRECISIONS.index(mine.precision)
    except ConfigError as exc:
        mine, code = exc, -1
    if strategy.world_size > 1:
        code = int(strategy.broadcast_from_main(torch.tensor([code], device=strategy.device)).item())
    if code < 0:
        if isinstance(mine, ConfigError):
            raise mine
        raise ConfigError("--precision auto: rank 0 refused the precision it chose (its error says why); "
                          "give --precision explicitly")
    agreed = PRECISIONS[code]
    if isinstance(mine, ConfigError) or mine.precision != agreed:
        log.warning("rank %d: --precision auto would choose %s on this rank's %s; every rank takes rank 0's %s",
                    strategy.rank, "another precision" if isinstance(mine, ConfigError) else mine.precision,
                    strategy.device, agreed)
    return cfg.replace(precision=agreed)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated on ``device``; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
