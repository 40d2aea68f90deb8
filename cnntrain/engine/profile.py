"""``--profile phases|ops``: where a training step's time goes, as SINGA's ``-v`` verbosity.

    cnntrain train ... --profile phases   # ms per step in data / forward / backward / communication / optimizer
    cnntrain train ... --profile ops      # torch.profiler table per operator + Chrome trace of a few steps

The trainer wraps each part of a step in ``with prof.phase(name):`` and calls ``prof.step()``
after it and ``prof.finish()`` at the end. Without ``--profile`` it gets :data:`OFF`, whose
``phase`` hands back one shared no-op context: the loop pays well under a microsecond per step
and never synchronises.

Output goes to ``<run_dir>/profile/``: ``profile.txt`` (the table also printed at the end) and
``phases.json`` or, for ``ops``, ``trace.json`` (open in chrome://tracing or Perfetto). Phase
times synchronise the CUDA device at each boundary (exact split, slightly slower steps); on the
CPU nothing extra happens. With DDP's overlapped all-reduce the exchange runs inside backward and
is counted there; "communication" is the exchange done outside it (``--no-overlap``,
``--partial-update``). Rank 0 profiles; other ranks run unprofiled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("cnntrain")

PHASES = ("data", "forward", "backward", "communication", "optimizer")
PHASE_WARMUP_STEPS = 1  # the first step (allocations, lazy init) is left out of the phase table
OPS_WAIT, OPS_WARMUP, OPS_ACTIVE = 2, 1, 5  # ops: skip 2 steps, warm the profiler up 1, record 5
OPS_ROWS = 25  # operators in the printed table


class NoProfiler:
    """Profiling off: every call is a no-op."""

    _null = contextlib.nullcontext()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return self._null

    def step(self) -> None:
        pass

    def finish(self) -> dict:
        return {}


OFF = NoProfiler()


class PhaseProfiler(NoProfiler):
    """Wall time per phase, summed over steps after the warm-up step."""

    def __init__(self, out_dir: Path, device: torch.device) -> None:
        self.out_dir = out_dir
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0  # counted steps (after the warm-up)
        self.seen = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.sync:
            self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def step(self) -> None:
        self.seen += 1
        if self.seen <= PHASE_WARMUP_STEPS:
            self.seconds = dict.fromkeys(self.seconds, 0.0)
        else:
            self.steps += 1

    def table(self) -> str:
        total = sum(self.seconds.values())
        steps = max(self.steps, 1)
        lines = [f"phase times over {self.steps} steps (after {PHASE_WARMUP_STEPS} warm-up step)",
                 f"{'phase':<14} {'ms/step':>9} {'share':>7} {'total s':>9}"]
        for name, seconds in self.seconds.items():
            lines.append(f"{name:<14} {1000 * seconds / steps:9.2f} {100 * seconds / max(total, 1e-12):6.1f}% "
                         f"{seconds:9.3f}")
        lines.append(f"{'total':<14} {1000 * total / steps:9.2f} {100.0:6.1f}% {total:9.3f}")
        return "\n".join(lines)

    def finish(self) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = self.table()
        (self.out_dir / "profile.txt").write_text(text + "\n")
        steps = max(self.steps, 1)
        ms = {name: 1000 * s / steps for name, s in self.seconds.items()}
        (self.out_dir / "phases.json").write_text(json.dumps({"steps": self.steps, "ms_per_step": ms}, indent=1))
        log.info("%s\n(written to %s)", text, self.out_dir / "profile.txt")
        return {"profile_ms_per_step": ms}


class OpsProfiler(NoProfiler):
    """torch.profiler over a bounded window of steps: a per-operator table and a Chrome trace."""

    def __init__(self, out_dir: Path, device: torch.device, total_steps: int) -> None:
        self.out_dir = out_dir
        self.device = device
        wait = min(OPS_WAIT, max(total_steps - 2, 0))
        warmup = min(OPS_WARMUP, max(total_steps - wait - 1, 0))
        self.active = max(min(OPS_ACTIVE, total_steps - wait - warmup), 1)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:
            # CUDA builds of torch on a machine without a GPU make kineto log a harmless
            # "ERROR ... gpuGetDeviceCount failed"; keep it from alarming the user.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self.text = ""
        schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=self.active, repeat=1)
        self.prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._ready)
        self.prof.start()
        self.running = True

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return torch.profiler.record_function(f"## {name} ##")

    def step(self) -> None:
        if self.running:
            self.prof.step()
            if self.text:  # the window is recorded: stop paying for the profiler
                self.prof.stop()
                self.running = False

    def _ready(self, prof: torch.profiler.profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        self.text = (f"operators over {self.active} profiled steps, sorted by {key}\n"
                     + prof.key_averages().table(sort_by=key, row_limit=OPS_ROWS))

    def finish(self) -> dict:
        if self.running:
            self.prof.stop()  # a run shorter than the window: whatever was recorded
            self.running = False
        if not self.text:
            return {}
        (self.out_dir / "profile.txt").write_text(self.text + "\n")
        log.info("%s\n(written to %s; Chrome trace %s)", self.text, self.out_dir / "profile.txt",
                 self.out_dir / "trace.json")
        return {}


def make_profiler(mode: str, out_dir: Path, device: torch.device, total_steps: int) -> NoProfiler:
    """The profiler for ``--profile mode`` writing into ``out_dir``; :data:`OFF` for ``none``."""
    if mode == "phases":
        return PhaseProfiler(out_dir, device)
    if mode == "ops":
        return OpsProfiler(out_dir, device, total_steps)
    return OFF
