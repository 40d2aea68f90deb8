"""The parameter server under load: 10,000 fuzzed frames, the ps token from the launcher, a flood of
refusals, the link cap. (The hostile messages one by one are in test_ps_hostile.py.)"""

from __future__ import annotations

import math
import random
import struct
import threading
import time
from pathlib import Path

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
)
from cnntrain.parallel.ps.frames import (
    DTYPES,
    HEADER,
    HEADER_BYTES,
    MAX_NUMBERS,
    Message,
)
from cnntrain.parallel.ps.launch import launch_local
from cnntrain.parallel.ps.server import run_ps
from tests.helpers import tiny
from tests.hostile_peer import (
    CLASSES,
    SHAPE,
    TOTAL,
    Job,
    Raw,
    _frame,
    _options,
    _push,
    _rss_mb,
)
from tests.test_dist_launch import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


# ------------------------------------------------------------------------------------------ fuzz


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    """One of: a header slot set to a nasty value, random bytes flipped, cut short, or run long."""
    data = bytearray(frame)
    kind = rng.randrange(4)
    if kind == 0:
        slot = rng.randrange(HEADER)
        value = rng.choice([math.nan, math.inf, -math.inf, -1.0, 0.0, 1.0, 2.0**31, 2.0**40, 2.0**53, 1e300, 0.5,
                            rng.uniform(-1e6, 1e6), float(rng.randrange(16))])
        data[8 * slot:8 * slot + 8] = struct.pack("<d", value)
    elif kind == 1:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:
        data = data[:rng.randrange(len(data))]
    else:
        data += rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def _claimed_bytes(frame: bytes) -> int | None:
    """The bytes a frame's header says it has (None if the ps will refuse the header itself)."""
    if len(frame) < HEADER_BYTES:
        return None
    values = struct.unpack(f"<{HEADER}d", frame[:HEADER_BYTES])
    try:
        return HEADER_BYTES + sum(DTYPES[int(values[4 + MAX_NUMBERS + 2 * i])].itemsize
                                  * int(values[5 + MAX_NUMBERS + 2 * i]) for i in range(int(values[3])))
    except (ValueError, IndexError, OverflowError):
        return None


def test_ten_thousand_random_and_mutated_frames_neither_kill_nor_hang_the_ps(tmp_path):
    job = Job(tmp_path, total=10**6)
    try:
        rng = random.Random(20270301)
        templates = [
            lambda: _frame(Message(P.PING)), lambda: _frame(Message(P.STATS)), lambda: _frame(Message(P.PULL, (0,))),
            lambda: _push(job, torch.randn(job.params) * 1e-3, torch.zeros(job.buffers, dtype=torch.float64)),
            lambda: _push(job, torch.empty(0), torch.empty(0, dtype=torch.float64)),
            lambda: _frame(Message(P.SCORED, (5,))), lambda: _frame(Message(P.FINISH)),
            lambda: _frame(Message(P.INIT, (0, CLASSES, *SHAPE, 8, TOTAL, 0.1, 1, 0), (torch.zeros(3),))),
        ]
        pushes = [_push(job, torch.randn(job.params) * 1e-3) for _ in range(4)]  # built once: the slow part
        templates[3] = lambda: rng.choice(pushes)
        started = time.monotonic()
        frames = hangs = 0
        raw = None
        while frames < 10_000:
            if raw is None:  # every fifth link is attacked before its HELLO, the others after
                raw = Raw(job.port)
                if rng.random() < 0.2:
                    hello_frame = _frame(Message(P.HELLO, (WORKER, 1, job.fingerprint, 3, 1, 0, *[0] * 8)))
                    raw.send(rng.randbytes(rng.randrange(600)) if rng.random() < 0.5 else _mutate(rng, hello_frame))
                    frames += 1
                    raw.close()
                    raw = None
                    continue
                reply = raw.hello(*rng.choice([(WORKER, 2), (EVALUATOR, 0)]), job.fingerprint)
                if reply is None or reply.op != P.OK:  # e.g. its last link is not seen closed yet
                    raw.close()
                    raw = Raw(job.port)
                    reply = raw.hello(EVALUATOR, 0, job.fingerprint)
                    assert reply is not None and reply.op == P.OK, reply
            frame = rng.choice(templates)()
            if rng.random() < 0.8:
                frame = _mutate(rng, frame)
            frames += 1
            sent = raw.send(frame)
            complete = _claimed_bytes(frame) == len(frame)
            if sent and complete:
                raw.sock.settimeout(15)
                try:
                    reply = raw.reply()
                except TimeoutError:
                    hangs += 1
                    reply = None
                if reply is not None and reply.op != P.REFUSED:
                    continue
            raw.close()
            raw = None
        took = time.monotonic() - started
        assert hangs == 0 and job.ps.poll() is None
        assert job.honest_step()[1] > 0 and job.chief.stats().alive[1]
        _, values, _ = job.chief.snapshot(job.plan)
        assert all(torch.isfinite(v).all() for v in values.values())
        assert _rss_mb(job.ps.pid) - job.rss_start < 100
        assert took < 60, f"{frames} frames took {took:.0f} s"
        text = job.log.read_text()
        assert "Traceback" not in text and "internal error" not in text
    finally:
        job.stop()


# ------------------------------------------------------------------------------------------ tokens


def test_without_a_token_anywhere_the_job_runs_and_the_ps_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(P.TOKEN_ENV, raising=False)
    options = _options(tmp_path, free_port(), workers=1)
    cfg = build_config(**options, role="ps", ps_index=0)
    cluster = cluster_from_config(cfg)
    server = threading.Thread(target=run_ps, args=(cfg, cluster), daemon=True)
    with caplog.at_level("INFO", logger="cnntrain"):
        server.start()
        stranger = PsClient(build_config(**options, role="evaluator"), cluster, EVALUATOR, 0, token="mine")
        with pytest.raises(DistributedError, match="bad token"):  # a token the token-less ps does not have
            stranger.connect()
        stranger.close(goodbye=False)
        chief = PsClient(build_config(**options, role="chief"), cluster, CHIEF, 0)
        chief.connect()
        assert chief.stats().alive == [True]
        chief.finish()
        chief.close()
        server.join(timeout=30)
    assert not server.is_alive()
    assert any("no ps token" in r.getMessage() and "any process" in r.getMessage() for r in caplog.records)


def test_the_local_launcher_hands_every_role_one_fresh_token_through_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(P.TOKEN_ENV, raising=False)
    started: list = []

    class FakeChild:
        def __init__(self, name, kind, argv, env):
            self.name, self.kind, self.code = name, kind, 0
            config = Path(argv[argv.index("--config") + 1]).read_text()
            started.append((argv, env, config))

        def poll(self):
            return 0

    monkeypatch.setattr("cnntrain.parallel.ps.launch._Child", FakeChild)
    cfg = build_config(**tiny(tmp_path / "run"), strategy="async-ps", ps_count=1, worker_count=2, evaluator=True)
    launch_local(cfg)
    tokens = {env[P.TOKEN_ENV] for _, env, _ in started}
    assert len(started) == 4 and len(tokens) == 1
    token = tokens.pop()
    assert len(token) == 64 and all(token not in " ".join(argv) and token not in config
                                     for argv, _, config in started)


def test_a_flood_of_refusals_is_printed_up_to_a_burst_then_counted(monkeypatch, caplog):
    from cnntrain.parallel.ps import server

    monkeypatch.setattr(server, "WARN_WINDOW_S", 0.3)
    warn = server._Warnings("ps 0")
    with caplog.at_level("WARNING", logger="cnntrain"):
        for i in range(server.WARN_BURST + 25):
            warn(f"refused link {i}")
        time.sleep(0.4)
        warn.flush()
        warn("refused one more")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:server.WARN_BURST] == [f"ps 0: refused link {i}" for i in range(server.WARN_BURST)]
    assert lines[server.WARN_BURST:] == ["ps 0: 25 more refusals in the last 0 s, not printed one by one",
                                         "ps 0: refused one more"]


def test_links_beyond_the_cap_are_refused_and_a_freed_slot_is_taken_again(tmp_path, monkeypatch):
    from cnntrain.parallel.ps.server import ParameterServer

    monkeypatch.delenv(P.TOKEN_ENV, raising=False)
    options = _options(tmp_path, free_port(), workers=2)
    cfg = build_config(**options, role="ps", ps_index=0)
    cluster = cluster_from_config(cfg)
    server = threading.Thread(target=ParameterServer(cfg, cluster, 0, max_links=2).serve, daemon=True)
    server.start()
    chief = PsClient(build_config(**options, role="chief"), cluster, CHIEF, 0)
    chief.connect()
    evaluator = PsClient(build_config(**options, role="evaluator"), cluster, EVALUATOR, 0)
    evaluator.connect()
    worker = PsClient(build_config(**options, role="worker", worker_index=1), cluster, WORKER, 1)
    with pytest.raises(DistributedError, match=r"refused the connection: it serves 2 links already"):
        worker.connect()
    worker.close(goodbye=False)
    evaluator.close()
    deadline = time.monotonic() + 10
    while True:  # the evaluator's slot frees once the ps has seen its goodbye
        worker = PsClient(build_config(**options, role="worker", worker_index=1), cluster, WORKER, 1)
        try:
            worker.connect()
            break
        except DistributedError:
            worker.close(goodbye=False)
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert chief.stats().alive == [True, True]
    worker.close()
    chief.finish()
    chief.close()
    server.join(timeout=30)
    assert not server.is_alive()
