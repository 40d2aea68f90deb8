"""A hostile or broken peer against a running parameter server: each attack is refused on its own
link with one warning naming the peer, while honest clients train on; the run finishes with finite
weights and the ps's memory barely moves. Then 10,000 random and mutated frames (fixed seed), and
the ps token: wrong, missing, and the token-less mode.

The ps runs as its own process (``_start_ps``) so that its memory can be read and a crash cannot
hide; honest and hostile clients run here."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnntrain.config import build_config
from cnntrain.errors import DistributedError
from cnntrain.models import create_model
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.client import PsClient
from cnntrain.parallel.ps.cluster import (
    CHIEF,
    EVALUATOR,
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
from cnntrain.parallel.ps.listener import Listener
from cnntrain.parallel.ps.store import ShardLayout, ShardStore
from tests.helpers import REPO, tiny
from tests.test_dist_launch import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

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


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    job = Job(tmp_path_factory.mktemp("hostile"))
    yield job
    job.stop()


def _authenticated(job: Job, role: int = WORKER, index: int = 2) -> Raw:
    raw = Raw(job.port)
    reply = raw.hello(role, index, job.fingerprint)
    assert reply is not None and reply.op == P.OK, reply
    return raw


def _push(job: Job, grads: torch.Tensor, buffers: torch.Tensor | None = None, pulled: int = 0) -> bytes:
    buffers = torch.zeros(job.buffers, dtype=torch.float64) if buffers is None else buffers
    return _frame(Message(P.PUSH, (pulled, 0, 0, 0), (grads, buffers)))


def _init(job: Job) -> bytes:
    """INIT with zero weights and a learning rate of 9: what a hostile worker would send."""
    tensors = (torch.zeros(job.params), torch.zeros(job.buffers, dtype=torch.float64))
    return _frame(Message(P.INIT, (0, CLASSES, *SHAPE, 8, TOTAL, 9.0, 1, 0), tensors))


def _nan_at(n: int, where: int, value: float = math.nan, dtype=torch.float32) -> torch.Tensor:
    t = torch.zeros(n, dtype=dtype)
    t[where] = value
    return t


# (name, role, index, the frame it sends once its HELLO is accepted, words the one warning line must hold)
ATTACKS = [
    ("init from a worker", WORKER, 2, lambda j: _init(j), "INIT is not allowed from worker 2"),
    ("finish from a worker", WORKER, 2, lambda j: _frame(Message(P.FINISH)), "FINISH is not allowed from worker 2"),
    ("abort from the evaluator", EVALUATOR, 0, lambda j: _frame(Message(P.ABORT, (CHIEF, 0))),
     "ABORT is not allowed from the evaluator"),
    ("scored from a worker", WORKER, 2, lambda j: _frame(Message(P.SCORED, (10**9,))),
     "SCORED is not allowed from worker 2"),
    ("nan gradient", WORKER, 2, lambda j: _push(j, _nan_at(j.params, 7)), "NaN or infinite values in the gradient"),
    ("inf gradient", WORKER, 2, lambda j: _push(j, _nan_at(j.params, j.params - 1, math.inf)),
     "NaN or infinite values in the gradient"),
    ("huge gradient", WORKER, 2, lambda j: _push(j, _nan_at(j.params, 3, 3e38)), "beyond 1e+15"),
    ("nan buffers", WORKER, 2, lambda j: _push(j, torch.zeros(j.params), _nan_at(j.buffers, 0, dtype=torch.float64)),
     "NaN or infinite values in the buffers"),
    ("short gradient", WORKER, 2, lambda j: _push(j, torch.zeros(j.params - 1)), "PUSH with tensors float32["),
    ("long gradient", WORKER, 2, lambda j: _push(j, torch.zeros(j.params + 1)), "PUSH with tensors float32["),
    ("float64 gradient", WORKER, 2, lambda j: _push(j, torch.zeros(j.params, dtype=torch.float64)),
     "PUSH with tensors float64["),
    ("one tensor", WORKER, 2, lambda j: _frame(Message(P.PUSH, (0, 0, 0, 0), (torch.zeros(j.params),))),
     "this ps takes float32[0 or"),
    ("gradient from the future", WORKER, 2, lambda j: _push(j, torch.zeros(j.params), pulled=10**6),
     "pulled at update 1000000"),
    ("a terabyte gradient", WORKER, 2, lambda j: _header(P.PUSH, (0, 0, 0, 0), ((0, 2**38), (1, j.buffers))),
     "float32[274877906944]"),
    ("nan numbers", WORKER, 2, lambda j: _frame(Message(P.PULL, (math.nan,))), "NaN or infinite"),
    ("wrong number count", WORKER, 2, lambda j: _frame(Message(P.PULL, (1, 2, 3))), "PULL with 3 numbers, not 1"),
    ("unknown request", WORKER, 2, lambda j: _frame(Message(99)), "unknown request 99"),
    ("bad magic", WORKER, 2, lambda j: b"\x00" * HEADER_BYTES, "not from this version"),
]


@pytest.mark.parametrize("name, role, index, make, words", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_hostile_message_ends_only_its_own_link(job, name, role, index, make, words):
    version = job.chief.stats().version
    raw = _authenticated(job, role, index)
    raw.send(make(job))
    assert raw.refused_and_closed(), name
    raw.close()
    lines = job.lines_about(raw.port)
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("WARNING"), lines
    done, after = job.honest_step()  # the ps goes on serving, and applied nothing of the attack
    assert not done and after == version + 1 and job.ps.poll() is None


@pytest.mark.parametrize("name, numbers, words", [
    ("nan in the hello", (WORKER, 1, math.nan, 3, 1, 0, *[0] * 8), "a number that is NaN or infinite"),
    ("a short hello", (WORKER, 1), "a HELLO with 2 numbers"),
    ("a proof word out of range", (WORKER, 1, 0, 3, 1, 0, *[2**40] * 8), "HELLO proof word"),
    ("a made-up proof", (WORKER, 1, 0, 3, 1, 0, *range(8)), "bad token"),
])
def test_a_malformed_hello_is_refused_before_anything_is_served(job, name, numbers, words):
    raw = Raw(job.port)
    raw.send(_header(P.HELLO, numbers))
    assert raw.refused_and_closed()
    raw.close()
    lines = job.lines_about(raw.port)
    assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.parametrize("role, index, words", [
    (WORKER, 3, "worker index 3 out of range (1..2"), (WORKER, -1, "worker index -1 out of range"),
    (WORKER, 0, "worker index 0 out of range"), (CHIEF, 1, "the chief with index 1"),
    (EVALUATOR, 5, "the evaluator with index 5"), (7, 0, "unknown role 7"),
])
def test_a_worker_index_out_of_range_is_refused(job, role, index, words):
    raw = Raw(job.port)
    reply = raw.hello(role, index, job.fingerprint)
    assert reply is not None and reply.op == P.REFUSED and int(reply.numbers[0]) == P.BAD_MESSAGE
    assert raw.reply() is None
    raw.close()
    lines = job.lines_about(raw.port)
    assert len(lines) == 1 and words in lines[0], lines
    assert job.chief.stats().alive == [True, True, False]


@pytest.mark.parametrize("change, words", [
    ({"lr": 0.5}, "its training options differ from this process's"),
    ({"worker_hosts": ",".join(["127.0.0.1"] * 4)}, "it belongs to a cluster of 3 workers and 1 ps, this process to 4"),
])
def test_a_role_started_with_other_options_or_another_cluster_is_told_which(job, change, words):
    """Roles of one job must agree on the training options and the cluster: the ps refuses the link
    and the process stops with one line saying which (not a hang, not a job-wide failure)."""
    cfg = build_config(**{**job.options, **change}, role="worker", worker_index=2)
    client = PsClient(cfg, cluster_from_config(cfg), WORKER, 2, token=TOKEN)
    with pytest.raises(DistributedError, match=rf"refused the connection: {re.escape(words)}"):
        client.connect()
    client.close(goodbye=False)
    assert job.honest_step()[1] > 0  # the job goes on


def test_a_link_meant_for_another_ps_is_refused_naming_it(job):
    raw = Raw(job.port)
    identity = (WORKER, 2, job.fingerprint, 3, 1, 1)  # a cluster of one ps, but "ps 1" wanted
    raw.send(_frame(Message(P.HELLO, (*identity, *P.proof(TOKEN, raw.nonce, identity)))))
    reply = raw.reply()
    assert reply.op == P.REFUSED and int(reply.numbers[0]) == P.WRONG_PS and int(reply.numbers[1]) == 0
    raw.close()


def test_an_impostor_chief_is_refused_and_a_terabyte_claim_allocates_nothing(job):
    raw = Raw(job.port)  # the chief is connected: a second one is refused (token or not)
    reply = raw.hello(CHIEF, 0, job.fingerprint)
    assert reply.op == P.REFUSED and int(reply.numbers[0]) == P.DUPLICATE and raw.reply() is None
    raw.close()
    for specs in (((0, 2**38),), ((2, 2**53),)):  # before the HELLO: 1 TB, then 64 PB, claimed in a first message
        raw = Raw(job.port)
        raw.send(_header(P.HELLO, (WORKER, 1), specs))
        assert raw.refused_and_closed()
        raw.close()
        lines = job.lines_about(raw.port)
        assert len(lines) == 1 and "before its HELLO" in lines[0] and "not a HELLO" in lines[0], lines
    assert _rss_mb(job.ps.pid) - job.rss_start < 100


def test_half_open_links_and_a_client_killed_mid_handshake_do_not_block_later_links(job):
    started = time.monotonic()
    flood = [Raw(job.port, read_challenge=False) for _ in range(1000)]  # connect, then say nothing
    silent = Raw(job.port)
    silent.send(_header(P.HELLO)[:100])  # a third of a HELLO, then silence
    killed = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; socket.create_connection(('127.0.0.1',"
                               f" {job.port})); print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert killed.stdout.readline() == b"up\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    evaluator = PsClient(build_config(**job.options, role="evaluator"), job.cluster, EVALUATOR, 0, ps_indices=[0],
                         token=TOKEN)
    evaluator.connect()  # at once, though 1,000 links are half open and one HELLO is a third sent
    assert evaluator.stats().version >= 0 and time.monotonic() - started < 15
    evaluator.close()
    for raw in (*flood, silent):
        raw.close()
    assert job.honest_step()[0] is False and _rss_mb(job.ps.pid) - job.rss_start < 100


def _challenged_then_closed(raw: Raw) -> bool:
    first = raw.reply()
    return (first is None or first.op == P.CHALLENGE) and raw.reply() is None


def test_the_listener_drops_silent_handshakes_after_a_while_and_the_oldest_first():
    port = free_port()
    warnings: list[str] = []
    listener = Listener("127.0.0.1", port, timeout=10, name="test ps", max_pending=4, handshake_s=0.5,
                        warn=warnings.append)
    try:
        quiet = [Raw(port, read_challenge=False) for _ in range(6)]  # two more than may wait: the first two go
        partial = Raw(port, read_challenge=False)
        partial.send(_header(P.HELLO)[:100])
        deadline = time.monotonic() + 5
        while listener.dropped < 3 and time.monotonic() < deadline:
            assert listener.accept(wait=0.05) is None
        assert listener.dropped == 3 and all(_challenged_then_closed(r) for r in quiet[:3])
        good = Raw(port, read_challenge=False)
        good.send(_frame(Message(P.HELLO, (1.0, 2.0))))
        while (peer := listener.accept(wait=0.05)) is None:  # the silent ones time out meanwhile
            assert time.monotonic() < deadline
        assert peer.first.numbers == (1.0, 2.0) and peer.nonce == good._challenge()
        while listener.handshaking:
            assert listener.accept(wait=0.05) is None and time.monotonic() < deadline
        assert listener.dropped == 7 and _challenged_then_closed(partial) and not warnings
        peer.close()
        for raw in (*quiet, partial, good):
            raw.close()
    finally:
        listener.close()


@pytest.mark.parametrize("token", ["a wrong token", ""], ids=["wrong", "missing"])
def test_a_wrong_or_missing_token_is_refused_with_one_line(job, token):
    before = job.log.read_text().count("bad token")
    client = PsClient(build_config(**job.options, role="worker", worker_index=2), job.cluster, WORKER, 2, token=token)
    with pytest.raises(DistributedError) as caught:
        client.connect()
    client.close(goodbye=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"worker 2: ps 0 (127.0.0.1:{job.port}) refused the "
                                                       f"connection: bad token: every role of the job needs the same")
    lines = [ln for ln in job.log.read_text().splitlines() if "bad token" in ln]
    assert len(lines) == before + 1 and lines[-1].startswith("WARNING ps 0 (127.0.0.1:")
    assert "refused a link from 127.0.0.1:" in lines[-1]


def test_the_honest_run_finishes_with_finite_weights_and_bounded_memory(job):
    """Last in this file: the attacks above left the job running; it now finishes."""
    done = False
    for _ in range(TOTAL):
        done, version = job.honest_step()
        if done:
            break
    assert done and version == TOTAL
    _, values, state = job.chief.snapshot(job.plan)
    assert all(torch.isfinite(v).all() for v in values.values())
    # Every attack was refused before it touched the weights: they are exactly the honest run's.
    assert len(job.pushed) == TOTAL
    assert torch.equal(flatten([values[name] for name in job.plan.param_names]), job.weights_without_attacks())
    assert all(torch.isfinite(v).all() for per_key in state.values() for v in per_key.values())
    assert _rss_mb(job.ps.pid) - job.rss_start < 100
    stats = job.chief.stats()
    assert stats.updates[0] == 0 and stats.updates[2] == 0 and stats.updates[1] == TOTAL  # no hostile update counted
    job.chief.finish()
    job.worker.close()
    job.chief.close()
    assert job.ps.wait(timeout=30) == 0
    text = job.log.read_text()
    assert "Traceback" not in text and "internal error" not in text
