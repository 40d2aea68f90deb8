"""``--role ps``: hold a shard of the parameters and apply every gradient pushed to it.

    cnntrain train --strategy async-ps --role ps --ps-index 0 --ps-hosts 10.0.0.1:2222 --worker-hosts ...

This module holds the ps's links: the accepting loop, each link's HELLO and its serving thread, the
cap on links and the rate-limited warnings about peers. What a ps does with each request (the
shard, the updates, ``--max-staleness``) is ``handler``.

One thread serves each link. A link that breaks is a lost worker (logged; the others go on; the
same index may connect again) unless it is the chief's, which ends the job: every later request
is answered FAILED, and the ps exits with a ``DistributedError`` once its clients have gone (or
``--dist-timeout`` has passed). After the chief's FINISH it answers DONE and exits the same way.

No peer is trusted (README, "Threat model"). A link must prove the job's token in its HELLO
(``protocol.proof``) before a thread serves it, at most ``LINKS_PER_PROCESS`` x (workers + 2)
links are served at once, and every request is checked before its tensors are read (``handler``).
A message that breaks a rule is refused (REFUSED, then the link is closed) with one warning naming
the peer; nothing of it is applied, and the job goes on (unless the sender was the chief, whose
loss always ends it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from cnntrain.config import TrainConfig
from cnntrain.errors import DistributedError
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.cluster import (
    CHIEF,
    EVALUATOR,
    PS,
    WORKER,
    Cluster,
    config_fingerprint,
    role_name,
)
from cnntrain.parallel.ps.frames import MAX_NUMEL, BadMessage, LinkError, Message, whole
from cnntrain.parallel.ps.handler import Client, RequestHandler
from cnntrain.parallel.ps.listener import Listener
from cnntrain.parallel.ps.transport import Peer

log = logging.getLogger("cnntrain")
LINKS_PER_PROCESS = 4  # links served at once per process of the job (room for reconnects)
WARN_BURST, WARN_WINDOW_S = 50, 10.0  # warnings about peers printed one by one per window, then counted


class _Warnings:
    """Warnings about peers: ``WARN_BURST`` per ``WARN_WINDOW_S`` one by one, the rest counted, so a
    flood of bad links cannot fill the log."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._since = time.monotonic()
        self._shown = self._hidden = 0

    def __call__(self, text: str) -> None:
        with self._lock:
            self._roll()
            if self._shown < WARN_BURST:
                self._shown += 1
                log.warning("%s: %s", self.name, text)
            else:
                self._hidden += 1

    def flush(self) -> None:
        with self._lock:
            self._roll()

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._since < WARN_WINDOW_S:
            return
        if self._hidden:
            log.warning("%s: %d more refusals in the last %.0f s, not printed one by one", self.name, self._hidden,
                        now - self._since)
        self._since, self._shown, self._hidden = now, 0, 0


class ParameterServer(RequestHandler):
    """One ps: the requests of ``RequestHandler``, served over links accepted here, one thread each."""

    def __init__(self, cfg: TrainConfig, cluster: Cluster, index: int, *, max_links: int | None = None) -> None:
        super().__init__(cfg, cluster, index)
        self.fingerprint = config_fingerprint(cfg)
        self.token = P.job_token(cfg)
        self.max_links = max_links or LINKS_PER_PROCESS * (cluster.num_workers + 2)
        self.warn = _Warnings(self.name)
        self.links = 0  # links with a serving thread (at most max_links)
        self.opening = 0  # links accepted whose HELLO is not answered yet (the ps waits for them too)
        self.chief_seen = False

    # ------------------------------------------------------------------ main loop
    def serve(self) -> dict:
        """Accept links until training is over and every client has gone; raise if the job failed."""
        host, port = self.cluster.ps[self.index]
        listener = Listener(host, port, self.timeout, self.name, max_pending=4 * self.max_links, warn=self.warn)
        log.info("%s: listening (%d workers, %s)", self.name, self.cluster.num_workers,
                 f"max staleness {self.cfg.max_staleness}" if self.cfg.max_staleness >= 0 else "staleness unbounded")
        if not self.token:
            log.warning("%s: no ps token (ps_token / $%s): a link proves only the training options, so any process "
                        "that can reach %s:%d can join; give every role the same token to require it", self.name,
                        P.TOKEN_ENV, host, port)
        started = last_report = time.monotonic()
        dropped = 0
        threads: list[threading.Thread] = []
        try:
            while True:
                peer = listener.accept(wait=0.02)
                if peer is not None:
                    thread = self._admit_link(peer)
                    if thread is not None:
                        threads.append(thread)
                    continue
                now = time.monotonic()
                if now - last_report >= WARN_WINDOW_S:
                    if listener.dropped > dropped:
                        log.warning("%s: %d connection(s) closed, went quiet or were pushed out by newer ones before "
                                    "their HELLO in the last %.0f s (the last from %s)", self.name,
                                    listener.dropped - dropped, now - last_report, listener.last_dropped)
                        dropped = listener.dropped
                    self.warn.flush()
                    threads = [t for t in threads if t.is_alive()]
                    last_report = now
                with self.cond:
                    if not self.chief_seen and self.failure is None and now - started > self.timeout:
                        self._fail(CHIEF, 0, P.NEVER_CONNECTED, "")
                    ended = self.failed_at if self.failure is not None else self.finished_at
                    gone = not self.clients and not self.opening and not listener.handshaking
                    if ended is not None and (gone or now - ended > self.timeout):
                        break
        finally:
            listener.close()
            for thread in threads:  # let finished links close their sockets before the interpreter exits
                thread.join(timeout=1.0)
        if self.failure is not None:
            raise DistributedError(f"{self.name}: stopping: {self._failure_text()}")
        if self.clients:
            log.warning("%s: training finished; %d client(s) still connected after %.0f s: %s", self.name,
                        len(self.clients), self.timeout,
                        ", ".join(role_name(c.role, c.index, self.cluster) for c in self.clients.values()))
        log.info("%s: done after %d updates", self.name, self.version)
        return {"version": self.version, "updates": list(self.updates)}

    # ------------------------------------------------------------------ one link
    def _admit_link(self, peer: Peer) -> threading.Thread | None:
        """Check a new link's HELLO (its form, its proof of the token, its role and index) here, in
        the accepting thread; start a thread to serve it only if it passes and there is room."""
        numbers = peer.first.numbers
        try:
            if len(numbers) != P.IDENTITY + P.PROOF_WORDS:
                raise BadMessage(P.BAD_NUMBERS, f"a HELLO with {len(numbers)} numbers, not "
                                                f"{P.IDENTITY + P.PROOF_WORDS}")
            identity = tuple(whole(v, -MAX_NUMEL, MAX_NUMEL, "HELLO value") for v in numbers[:P.IDENTITY])
            given = tuple(whole(v, 0, 2**32 - 1, "HELLO proof word") for v in numbers[P.IDENTITY:])
        except BadMessage as exc:
            self._refuse(peer, (P.BAD_MESSAGE, exc.problem), f"refused a link from {peer.address}: {exc}")
            return None
        if not P.proof_matches(self.token, peer.nonce, identity, given):
            self._refuse(peer, (P.BAD_TOKEN,), f"refused a link from {peer.address}: bad token (its HELLO does not "
                                               f"prove this job's ps token)")
            return None
        role, index = identity[:2]
        wrong = self._wrong_identity(role, index)
        if wrong:
            self._refuse(peer, (P.BAD_MESSAGE, P.BAD_INDEX), f"refused a link from {peer.address}: {wrong}")
            return None
        with self.cond:
            busy = self.links >= self.max_links
            if not busy:
                self.links += 1
                self.opening += 1
        if busy:
            self._refuse(peer, (P.BUSY, self.max_links), f"refused a link from {peer.address} "
                                                          f"({role_name(role, index)}): {self.max_links} links are "
                                                          f"open already")
            return None
        thread = threading.Thread(target=self._serve_link, args=(peer, identity), name=f"link {peer.number}",
                                  daemon=True)
        thread.start()
        return thread

    def _wrong_identity(self, role: int, index: int) -> str:
        """What is wrong with the role and index a HELLO claims ("" if nothing)."""
        if role not in (CHIEF, WORKER, EVALUATOR):
            return f"unknown role {role}"
        if role == CHIEF and index != 0:
            return f"the chief with index {index} (it is worker 0)"
        if role == WORKER and not 1 <= index < self.cluster.num_workers:
            return (f"worker index {index} out of range (1..{self.cluster.num_workers - 1}; the chief is worker 0)")
        if role == EVALUATOR and index != 0:
            return f"the evaluator with index {index}"
        return ""

    def _refuse(self, peer: Peer, numbers: tuple[int, ...], text: str) -> None:
        """One warning, a REFUSED reply (best effort: a hostile peer may not read it), and the link closed."""
        self.warn(text)
        with contextlib.suppress(LinkError):
            peer.send(Message(P.REFUSED, numbers), timeout=1.0)
        peer.close()

    def _serve_link(self, peer: Peer, identity: tuple[int, ...]) -> None:
        client: Client | None = None
        try:
            try:
                client = self._hello(peer, identity)
            finally:
                with self.cond:
                    self.opening -= 1
                    if client is not None:
                        self.clients[peer.number] = client
            if client is None:
                return
            while not client.said_bye:
                peer.send(self._serve_request(peer, client))
        except BadMessage as exc:
            if client is not None:  # its slot is free before it reads the refusal, so it may reconnect at once
                self._lost(client, str(exc), quiet=True)
                self._refuse(peer, (P.BAD_MESSAGE, exc.problem),
                             f"refused a message from {role_name(client.role, client.index, self.cluster)} "
                             f"({peer.address}): {exc}; its link is closed")
        except LinkError as exc:
            if client is not None:
                self._lost(client, str(exc))
        except Exception:  # a bug here must not leave the job hanging: end it, loudly
            log.exception("%s: internal error while serving %s", self.name,
                          role_name(client.role, client.index, self.cluster) if client else "a link")
            with self.cond:
                self._fail(PS, self.index, P.LOST, "itself (internal error)")
        finally:
            peer.close()
            with self.cond:
                self.links -= 1
                if client is not None:
                    self._leave(client)
                    self.clients.pop(peer.number, None)
                self.cond.notify_all()

    def _hello(self, peer: Peer, identity: tuple[int, ...]) -> Client | None:
        role, index, fingerprint, workers, num_ps, ps = identity
        who = role_name(role, index, self.cluster)
        refuse = None
        with self.cond:
            if fingerprint != self.fingerprint:
                refuse = (P.BAD_CONFIG, 0), "its training options differ from this ps's"
            elif workers != self.cluster.num_workers or num_ps != self.cluster.num_ps:
                refuse = ((P.BAD_CLUSTER, self.cluster.num_workers, self.cluster.num_ps),
                          f"it belongs to a cluster of {workers} workers and {num_ps} ps")
            elif ps != self.index:
                refuse = (P.WRONG_PS, self.index), f"it wanted ps {ps}"
            elif role in (CHIEF, WORKER) and self.workers_alive[index]:
                refuse = (P.DUPLICATE, index), f"{who} is connected already"
            if refuse is None:
                client = Client(role, index)
                if client.worker is not None:
                    self.workers_alive[index] = True
                    self.joins[index] += 1
                    if self.joins[index] > 1:
                        log.warning("%s: %s rejoined (its connection %d)", self.name, role_name(role, index),
                                    self.joins[index])
                    else:
                        log.info("%s: %s connected", self.name, role_name(role, index))
                if role == CHIEF:
                    self.chief_seen = True
                if role == EVALUATOR:
                    self.evaluator_seen = True
                    log.info("%s: the evaluator connected", self.name)
        if refuse is not None:
            self._refuse(peer, refuse[0], f"refused {who} ({peer.address}): {refuse[1]}")
            return None
        with self.cond:
            failure = self.failure
            finished = int(self.finished_at is not None)
            reply = Message(P.OK, (self.index, int(self.initialised), self.run_stamp, finished))
        peer.send(Message(P.FAILED, failure[:3]) if failure else reply)
        return client

    def _lost(self, client: Client, why: str, quiet: bool = False) -> None:
        """``client``'s link is gone; ``quiet``: the reason has been logged already."""
        with self.cond:
            who = role_name(client.role, client.index, self.cluster)
            if client.worker is not None:
                self.workers_alive[client.index] = False
            if client.role == EVALUATOR:
                self.evaluator_seen = False
            if client.said_bye or self.failure is not None or self.finished_at is not None:
                return
            if client.role == CHIEF:
                self._fail(CHIEF, 0, P.LOST, "")
            elif client.role == WORKER:
                self.losses[client.index] += 1
                alive = sum(self.workers_alive)
                if not quiet:
                    log.warning("%s: %s lost (%s); training goes on with %d worker(s); the same --worker-index "
                                "may rejoin", self.name, who, why, alive)
            elif client.role == EVALUATOR and not quiet:
                log.warning("%s: %s lost (%s)", self.name, who, why)


def run_ps(cfg: TrainConfig, cluster: Cluster) -> dict:
    """Serve as ``--ps-index`` until the job ends."""
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    return ParameterServer(cfg, cluster, cfg.ps_index).serve()
