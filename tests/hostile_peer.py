"""A raw ps peer for the hostile-peer tests: frames built by hand, and a ps process with an honest
chief and worker on it (``Job``)."""


from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import torch

from cnntrain.config import build_config
from cnntrain.models import create_model
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.client import PsClient
from cnntrain.parallel.ps.cluster import (
    CHIEF,
    WORKER,
    ShardPlan,
    cluster_from_config,
    config_fingerprint,
    flatten,
)
from cnntrain.parallel.ps.frames import (
    DTYPES,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    MAX_NUMBERS,
    Message,
    encode_header,
)
from cnntrain.parallel.ps.store import ShardLayout, ShardStore
from tests.helpers import REPO, tiny
from tests.test_dist_launch import free_port

TOKEN = "correct horse battery staple"
TOTAL = 40  # updates in the honest run
MODEL, CLASSES, SHAPE = "resnet20", 10, (3, 32, 32)  # BatchNorm: buffers travel too
_RUN_PS = """
import json, logging, sys
from cnntrain.config import build_config
from cnntrain.parallel.ps.cluster import cluster_from_config
from cnntrain.parallel.ps.server import run_ps
from cnntrain.parallel.ps.store import ShardLayout, ShardStore
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
cfg = build_config(**json.loads(sys.argv[1]))
run_ps(cfg, cluster_from_config(cfg))
"""


def _options(run_dir, port: int, workers: int = 3, total: int = TOTAL) -> dict:
    return dict(tiny(run_dir, model=MODEL, synthetic_shape=list(SHAPE), max_steps=total, epochs=0, progress="none"),
                strategy="async-ps", ps_hosts=f"127.0.0.1:{port}", worker_hosts=",".join(["127.0.0.1"] * workers),
                dist_timeout=30)


def _start_ps(options: dict, log: Path, token: str = TOKEN) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", P.TOKEN_ENV: token}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", _RUN_PS, json.dumps({**options, "role": "ps", "ps_index": 0})],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _header(op: int, numbers=(), specs=()) -> bytes:
    """A header with whatever counts, numbers and (dtype code, length) pairs, true or not."""
    values = [0.0] * HEADER
    values[:4] = [MAGIC, op, len(numbers), len(specs)]
    values[4:4 + len(numbers)] = numbers
    for i, (code, numel) in enumerate(specs):
        values[4 + MAX_NUMBERS + 2 * i], values[5 + MAX_NUMBERS + 2 * i] = code, numel
    return struct.pack(f"<{HEADER}d", *values)


def _frame(msg: Message) -> bytes:
    return encode_header(msg) + b"".join(t.numpy().tobytes() for t in msg.tensors)


class Raw:
    """A connection to the ps driven by hand: it sends whatever bytes it is given."""

    def __init__(self, port: int, read_challenge: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.port = self.sock.getsockname()[1]
        self.nonce = self._challenge() if read_challenge else None

    def _read(self, n: int) -> bytes | None:
        data = b""
        try:
            while len(data) < n:
                chunk = self.sock.recv(n - len(data))
                if not chunk:
                    return None
                data += chunk
        except TimeoutError:
            raise
        except OSError:  # reset by the ps
            return None
        return data

    def _challenge(self) -> tuple[int, ...]:
        values = struct.unpack(f"<{HEADER}d", self._read(HEADER_BYTES))
        assert values[0] == MAGIC and values[1] == P.CHALLENGE
        return tuple(int(v) for v in values[4:4 + int(values[2])])

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def reply(self) -> Message | None:
        """The next reply, or None once the ps has closed the link."""
        data = self._read(HEADER_BYTES)
        if data is None:
            return None
        values = struct.unpack(f"<{HEADER}d", data)
        numbers = tuple(values[4:4 + int(values[2])])
        tensors = []
        for i in range(int(values[3])):
            dtype, numel = DTYPES[int(values[4 + MAX_NUMBERS + 2 * i])], int(values[5 + MAX_NUMBERS + 2 * i])
            raw = self._read(numel * dtype.itemsize) if numel else b""
            if raw is None:
                return None
            tensors.append(torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype))
        return Message(int(values[1]), numbers, tuple(tensors))

    def hello(self, role: int, index: int, fingerprint: int, token: str = TOKEN, workers: int = 3) -> Message | None:
        identity = (role, index, fingerprint, workers, 1, 0)
        self.send(_frame(Message(P.HELLO, (*identity, *P.proof(token, self.nonce, identity)))))
        return self.reply()

    def refused_and_closed(self) -> bool:
        """Whether the ps answers REFUSED (if anything) and then closes the link."""
        reply = self.reply()
        if reply is not None and reply.op != P.REFUSED:
            return False
        return self.reply() is None

    def close(self) -> None:
        self.sock.close()


class Job:
    """A ps process, the chief and worker 1 on it (honest), and what its log says."""

    def __init__(self, tmp_path: Path, total: int = TOTAL) -> None:
        self.port = free_port()
        self.options = _options(tmp_path / "run", self.port, total=total)
        self.log = tmp_path / "ps.log"
        self.ps = _start_ps(self.options, self.log)
        cfg = build_config(**self.options, role="chief")
        self.cluster = cluster_from_config(cfg)
        self.fingerprint = config_fingerprint(cfg)
        self.plan = ShardPlan.for_model(create_model(MODEL, CLASSES), 1)
        self.chief = PsClient(cfg, self.cluster, CHIEF, 0, token=TOKEN)
        self.chief.connect()
        self.init_numbers = (0, CLASSES, *SHAPE, 8, total, 0.05, 1)
        initial = create_model(MODEL, CLASSES)
        self.initial = {k: v.clone() for k, v in initial.state_dict().items()}
        self.chief.init(initial, self.plan, self.init_numbers, None)
        self.pushed: list[torch.Tensor] = []  # every honest gradient, in order
        self.worker = PsClient(build_config(**self.options, role="worker", worker_index=1), self.cluster, WORKER, 1,
                               token=TOKEN)
        self.worker.connect()
        self.model = create_model(MODEL, CLASSES)
        self.worker.bind(self.model, self.plan)
        self.worker.pull()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.buffers = sum(b.numel() for b in self.model.buffers())
        self.rss_start = _rss_mb(self.ps.pid)
        self.gen = torch.Generator().manual_seed(0)

    def honest_step(self) -> tuple[bool, int]:
        for p in self.model.parameters():
            p.grad = torch.randn(p.shape, generator=self.gen) * 0.01
        done, version = self.worker.push_pull()
        if version > len(self.pushed):  # applied (this worker is the only one that pushes)
            self.pushed.append(flatten([p.grad for p in self.model.parameters()]))
        return done, version

    def weights_without_attacks(self) -> torch.Tensor:
        """The weights the ps would hold after the honest gradients alone: its own shard code, fed
        the same INIT and the same gradients in the same order, in this process."""
        cfg = build_config(**self.options, role="ps", ps_index=0)
        layout = ShardLayout.from_numbers(cfg, self.cluster, 0, (*self.init_numbers, 0))
        model = create_model(MODEL, CLASSES)
        model.load_state_dict(self.initial)
        store = ShardStore.from_init(layout, (flatten(list(model.parameters())),
                                              flatten(list(model.buffers()), torch.float64)))
        for version, grads in enumerate(self.pushed):
            store.apply(grads, version)
        return store.flat_params()

    def lines_about(self, port: int) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if f"127.0.0.1:{port}" in ln]

    def stop(self) -> None:
        for client in (self.worker, self.chief):
            client.close(goodbye=False)
        if self.ps.poll() is None:
            self.ps.kill()
        self.ps.wait()


def _push(job: Job, grads: torch.Tensor, buffers: torch.Tensor | None = None, pulled: int = 0) -> bytes:
    buffers = torch.zeros(job.buffers, dtype=torch.float64) if buffers is None else buffers
    return _frame(Message(P.PUSH, (pulled, 0, 0, 0), (grads, buffers)))
