"""Fault injection for subprocesses started by the tests: put this folder on PYTHONPATH and set

    CNNTRAIN_FAULT=step:N        SIGKILL this process at the start of its N-th training step
    CNNTRAIN_FAULT=write:N       SIGKILL it half-way through writing checkpoint step-N.pt
    CNNTRAIN_FAULT=manifest:N    SIGKILL it after step-N.pt is in place, before its manifest
    CNNTRAIN_FAULT_RANK=r        only in the process with RANK r (default: any)
    CNNTRAIN_FAULT_MARKER=path   created just before the kill; no kill once it exists, so a
                                 restarted or resumed process runs on undisturbed

The kill is a real SIGKILL: no exception handler, ``finally`` or atexit hook runs, exactly as when
the machine loses power or the OOM killer strikes.
"""

import os
import signal
from pathlib import Path

_FAULT = os.environ.get("CNNTRAIN_FAULT")


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


def _install(kind: str, n: int) -> None:
    import io

    from cnntrain.engine import checkpoint, trainer

    if kind == "step":
        real_set_lr, calls = trainer.set_lr, [0]

        def set_lr(optimizer, *args):  # called once per optimizer step, before its forward
            calls[0] += 1
            if calls[0] == n and _armed():
                _die()
            return real_set_lr(optimizer, *args)

        trainer.set_lr = set_lr
        return

    real_write = checkpoint._atomic_write
    target = f"step-{n:08d}"

    def atomic_write(path, write):
        if kind == "write" and path.name == f"{target}.pt" and _armed():
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            with open(path.with_name(f".{path.name}.tmp{os.getpid()}"), "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()
        if kind == "manifest" and path.name == f"{target}.json" and _armed():
            _die()
        return real_write(path, write)

    checkpoint._atomic_write = atomic_write


if _FAULT and _armed():
    _kind, _, _n = _FAULT.partition(":")
    if _kind not in ("step", "write", "manifest") or not _n.isdigit():
        raise SystemExit(f"CNNTRAIN_FAULT={_FAULT!r}: expected step:N, write:N or manifest:N")
    _install(_kind, int(_n))
