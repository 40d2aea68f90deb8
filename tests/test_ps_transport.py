"""The async parameter server's transport and its edges: messages over one TCP connection per link,
a vanished client, a role that comes up just as the job ends (its link half-built, or after the end)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cnntrain.config import build_config
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.client import JOB_STARTED_ENV, PsClient, run_finished
from cnntrain.parallel.ps.cluster import CHIEF, EVALUATOR, cluster_from_config
from cnntrain.parallel.ps.frames import LinkError, Message
from cnntrain.parallel.ps.listener import Listener
from cnntrain.parallel.ps.server import run_ps
from cnntrain.parallel.ps.transport import GaveUp, Link
from tests.test_async_ps import _cluster_options
from tests.test_dist_launch import free_port

pytestmark = pytest.mark.dist


def test_transport_carries_numbers_and_tensors_and_reports_a_vanished_client():
    port = free_port()
    listener = Listener("127.0.0.1", port, timeout=10, name="test ps")
    seen: dict = {}

    def serve():
        while (peer := listener.accept(wait=0.05)) is None:
            pass
        seen["hello"] = peer.first
        peer.send(Message(P.OK))
        msg = peer.recv(10)
        peer.send(Message(msg.op + 1, tuple(n * 2 for n in msg.numbers), tuple(t * 2 for t in msg.tensors)))
        try:
            peer.recv(10)
        except LinkError as exc:
            seen["error"] = str(exc)
        peer.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    link = Link.connect("127.0.0.1", port, local_host="127.0.0.1", timeout=10, name="test ps")
    assert len(link.nonce) == P.NONCE_WORDS and all(0 <= w < 2**32 for w in link.nonce)
    assert link.request(Message(P.HELLO, (3.0, 4.0))).op == P.OK
    tensors = (torch.arange(5, dtype=torch.float32), torch.tensor([1.5, -2.0], dtype=torch.float64),
               torch.tensor([2**40], dtype=torch.int64), torch.empty(0))
    reply = link.request(Message(7, (1.0, 2.5, 2**50), tensors))
    assert reply.op == 8 and reply.numbers == (2.0, 5.0, 2.0**51)
    assert all(torch.equal(a * 2, b) and a.dtype == b.dtype for a, b in zip(tensors, reply.tensors))
    link.close()  # closes the connection without a goodbye: the server's next read fails at once
    server.join(timeout=10)
    listener.close()
    assert seen["hello"].numbers == (3.0, 4.0) and seen["error"] == "connection closed"
    with pytest.raises(LinkError, match="not reachable within 1 s"):
        Link.connect("127.0.0.1", free_port(), local_host="127.0.0.1", timeout=1, name="ps 9")
    started = time.monotonic()
    with pytest.raises(GaveUp):  # e.g. the run finished before this role came up
        Link.connect("127.0.0.1", free_port(), local_host="127.0.0.1", timeout=60, name="ps 9", stop=lambda: True)
    assert time.monotonic() - started < 10


def test_a_server_that_goes_away_while_a_link_is_built_ends_connect_at_once():
    """A role that came up just as the job ended must not wait out --dist-timeout for a challenge."""
    for stop, error in ((None, LinkError), (lambda: True, GaveUp)):
        port = free_port()
        listener = Listener("127.0.0.1", port, timeout=60, name="test ps")
        outcome: dict = {}

        def connect(stop=stop, port=port, outcome=outcome):
            started = time.monotonic()
            try:
                Link.connect("127.0.0.1", port, local_host="127.0.0.1", timeout=60, name="ps 0", stop=stop)
            except LinkError as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

        client = threading.Thread(target=connect, daemon=True)
        client.start()
        time.sleep(1.0)  # the client is connected (in the listen backlog) and waits for the challenge ...
        listener.close()  # ... and the server ends without accepting it
        client.join(timeout=30)
        assert not client.is_alive() and type(outcome["error"]) is error and outcome["seconds"] < 20


def test_the_ps_answers_a_role_whose_link_opens_as_the_chief_finishes(tmp_path, monkeypatch):
    options = _cluster_options(tmp_path, 1)
    ps_cfg = build_config(**options, role="ps", ps_index=0)
    cluster = cluster_from_config(ps_cfg)
    challenged, chief_gone = threading.Event(), threading.Event()
    real_connect = Link.connect.__func__

    def slow_connect(cls, *args, **kwargs):  # the evaluator's HELLO is still to come when the last client leaves
        link = real_connect(cls, *args, **kwargs)
        if threading.current_thread().name == "evaluator":
            challenged.set()
            chief_gone.wait(20)
            time.sleep(0.5)
        return link

    monkeypatch.setattr(Link, "connect", classmethod(slow_connect))
    result: dict = {}
    ps = threading.Thread(target=lambda: result.update(ps=run_ps(ps_cfg, cluster)), daemon=True)
    ps.start()
    chief = PsClient(build_config(**options, role="chief"), cluster, CHIEF, 0)
    chief.connect()
    evaluator = PsClient(build_config(**options, role="evaluator"), cluster, EVALUATOR, 0, ps_indices=[0])

    def evaluate():
        evaluator.connect()
        result["finished"] = evaluator.stats().finished
        evaluator.close()

    scorer = threading.Thread(target=evaluate, name="evaluator", daemon=True)
    scorer.start()
    assert challenged.wait(20)
    chief.finish()
    chief.close()
    chief_gone.set()
    scorer.join(timeout=30)
    ps.join(timeout=30)
    assert not scorer.is_alive() and not ps.is_alive()
    assert result["finished"] is True and "ps" in result


def test_a_role_that_comes_up_after_the_run_finished_can_tell(tmp_path, monkeypatch):
    cfg = build_config(**_cluster_options(tmp_path, 2))
    monkeypatch.setenv(JOB_STARTED_ENV, str(time.time() - 5))
    finished = run_finished(cfg)
    assert not finished()
    (tmp_path / "summary.json").write_text("{}")
    assert finished()
    monkeypatch.setenv(JOB_STARTED_ENV, str(time.time() + 60))  # a summary from an earlier run does not count
    assert not run_finished(cfg)()
