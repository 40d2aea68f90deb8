"""Fault injection through the public callback API, for training processes started by the tests:

    cnntrain train ... --callbacks injection:FaultInjection       # with tests/faults on PYTHONPATH

and the fault in the environment:

    CNNTRAIN_FAULT=step:N        SIGKILL this process at the start of its N-th training step
    CNNTRAIN_FAULT=write:N       SIGKILL it half-way through writing checkpoint step-N.pt
    CNNTRAIN_FAULT=manifest:N    SIGKILL it once step-N.pt is in place but before its manifest is
    CNNTRAIN_FAULT=saved:N       SIGKILL it once step-N.pt and its manifest are in place, before the
                                 callbacks after this one (a tracker sending its rows) see it
    CNNTRAIN_FAULT_RANK=r        only in the process with RANK r (default: any)
    CNNTRAIN_FAULT_MARKER=path   created just before the kill; no kill once it exists, so a
                                 restarted or resumed process runs on undisturbed

The kill is a real SIGKILL: no exception handler, ``finally`` or atexit hook runs, exactly as when
the machine loses power or the OOM killer strikes. ``write`` leaves what a writer killed mid-write
leaves (half the bytes in a temp file beside the target, never renamed); ``manifest`` leaves the
checkpoint without its manifest, as a kill between the two renames does.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import torch

from cnntrain import Callback
from cnntrain.engine import checkpoint


def _armed() -> bool:
    rank = os.environ.get("CNNTRAIN_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return False
    marker = os.environ.get("CNNTRAIN_FAULT_MARKER")
    return not (marker and Path(marker).exists())


def _die() -> None:
    marker = os.environ.get("CNNTRAIN_FAULT_MARKER")
    if marker:
        Path(marker).touch()
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjection(Callback):
    def __init__(self) -> None:
        fault = os.environ.get("CNNTRAIN_FAULT", "")
        kind, _, n = fault.partition(":")
        if kind not in ("step", "write", "manifest", "saved") or not n.isdigit():
            raise SystemExit(f"CNNTRAIN_FAULT={fault!r}: expected step:N, write:N, manifest:N or saved:N")
        self.kind, self.n = kind, int(n)

    def _at_step_start(self, steps_done: int) -> None:
        if self.kind == "step" and steps_done + 1 == self.n and _armed():
            _die()

    def on_train_start(self, loop) -> None:
        self._at_step_start(loop.state.step)

    def on_step_end(self, loop, outcome) -> None:
        self._at_step_start(loop.state.step)  # nothing else runs before the next step starts

    def on_save_checkpoint(self, loop, payload, path) -> None:
        if self.kind == "write" and path.name == f"step-{self.n:08d}.pt" and _armed():
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()
            with open(checkpoint.temp_path(path, loop.run_id), "wb") as f:  # where the writer puts it
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()

    def on_checkpoint(self, loop, path) -> None:
        if self.kind in ("manifest", "saved") and path.name == f"step-{self.n:08d}.pt" and _armed():
            if self.kind == "manifest":
                path.with_suffix(".json").unlink()
            _die()
