"""A hostile or broken peer against a running parameter server: each attack is refused on its own
link with one warning naming the peer, while honest clients train on; the run finishes with finite
weights and the ps's memory barely moves. Then 10,000 random and mutated frames (fixed seed), and
the ps token: wrong, missing, and the token-less mode.

The ps runs as its own process (``_start_ps``) so that its memory can be read and a crash cannot
hide; honest and hostile clients run here."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnntrain.config import build_config
from cnntrain.errors import DistributedError
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.client import PsClient
from cnntrain.parallel.ps.cluster import (
    CHIEF,
    EVALUATOR,
    WORKER,
    cluster_from_config,
    flatten,
)
from cnntrain.parallel.ps.frames import (
    HEADER_BYTES,
    Message,
)
from cnntrain.parallel.ps.listener import Listener
from tests.hostile_peer import (
    CLASSES,
    SHAPE,
    TOKEN,
    TOTAL,
    Job,
    Raw,
    _frame,
    _header,
    _push,
    _rss_mb,
)
from tests.test_dist_launch import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

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
