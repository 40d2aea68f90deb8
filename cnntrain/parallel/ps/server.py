"""``--role ps``: hold a shard of the parameters and apply every gradient pushed to it.

    cnntrain train --strategy async-ps --role ps --ps-index 0 --ps-hosts 10.0.0.1:2222 --worker-hosts ...

The chief sends the initial weights (INIT). Each push is applied at once, in arrival order, by the
same ``torch.optim`` optimizer the synchronous path builds (``build_optimizer``; ``store.py``), over this shard's
parameters as separate tensors, with the learning rate ``lr_at(version)``; momentum and Adam state
stay here. ``version`` counts the updates applied, so the staleness of a gradient is the version
at its push minus the version its worker pulled.

BatchNorm running statistics (and every other state buffer) are sharded like the parameters: a
worker pulls them with the weights, runs its batch, and pushes its new values; the ps adds the
difference to its copy, so the copy is a running average over every worker's batches.

``--max-staleness K`` (ps 0 decides): with ``n`` workers between their pull and their push (pulled
at versions ``v_i``), a gradient can be applied at most ``version - v_i + n - 1`` updates late,
since each of the others pushes at most once before it. A pull waits (first come, first served)
until letting it in keeps that at most K for everyone, including itself (``n <= K``); pushes never
wait. So no gradient is ever more than K updates stale, and K = 0 is sequential SGD. The client
pushes to ps 1.. before ps 0 and pulls them after ps 0 lets it in, so ps 0's order holds on every
shard.

One thread serves each link. A link that breaks is a lost worker (logged; the others go on; the
same index may connect again) unless it is the chief's, which ends the job: every later request
is answered FAILED, and the ps exits with a ``DistributedError`` once its clients have gone (or
``--dist-timeout`` has passed). After the chief's FINISH it answers DONE and exits the same way.

No peer is trusted (README, "Threat model"). A link must prove the job's token in its HELLO
(``protocol.proof``) before a thread serves it, at most ``LINKS_PER_PROCESS`` x (workers + 2)
links are served at once, and every request is checked before its tensors are read: the op
against the sender's role (``protocol.RULES``), its numbers, each tensor's type and exact length
against the shard, then the values (finite, and a gradient no larger than
``protocol.MAX_GRADIENT``). A message that breaks a rule is refused (REFUSED, then the link is
closed) with one warning naming the peer; nothing of it is applied, and the job goes on (unless
the sender was the chief, whose loss always ends it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field

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
from cnntrain.parallel.ps.store import ShardLayout, ShardStore
from cnntrain.parallel.ps.transport import (
    MAX_NUMEL,
    BadMessage,
    LinkError,
    Listener,
    Message,
    Peer,
    check_values,
    show_specs,
    whole,
)

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


@dataclass
class Client:
    role: int
    index: int
    base: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))  # buffers last sent
    outstanding: bool = False  # let in by --max-staleness, and not pushed yet
    pulled_at: int = 0  # version it was let in at
    said_bye: bool = False

    @property
    def worker(self) -> int | None:
        return self.index if self.role in (CHIEF, WORKER) else None


class ParameterServer:
    def __init__(self, cfg: TrainConfig, cluster: Cluster, index: int, *, max_links: int | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.index = index
        self.name = cluster.ps_name(index)
        self.timeout = cfg.dist_timeout
        self.fingerprint = config_fingerprint(cfg)
        self.token = P.job_token(cfg)
        self.max_links = max_links or LINKS_PER_PROCESS * (cluster.num_workers + 2)
        self.warn = _Warnings(self.name)
        self.cond = threading.Condition()
        self.version = 0
        self.total_steps = 0
        self.initialised = False
        self.finished_at: float | None = None
        self.failure: tuple[int, int, int, str] | None = None  # role, index, cause, reporter
        self.failed_at: float | None = None
        self.run_stamp = 0
        self.clients: dict[int, Client] = {}  # open links by link number
        self.links = 0  # links with a serving thread (at most max_links)
        self.opening = 0  # links accepted whose HELLO is not answered yet (the ps waits for them too)
        self.workers_alive = [False] * cluster.num_workers
        self.joins = [0] * cluster.num_workers
        self.losses = [0] * cluster.num_workers
        self.updates = [0] * cluster.num_workers
        self.staleness = [0] * P.STALENESS_BINS
        self.scored_step = -1
        self.evaluator_seen = False
        self.bound = cfg.max_staleness if index == 0 else -1  # -1: off
        self.queue: collections.deque[int] = collections.deque()
        self.chief_seen = False
        self.store: ShardStore | None = None  # from the chief's INIT

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

    def _failure_text(self) -> str:
        role, index, cause, reporter = self.failure
        who = role_name(role, index, self.cluster)
        if cause == P.NEVER_CONNECTED:
            return f"{who} did not connect within {self.timeout:.0f} s (--dist-timeout)"
        text = f"{who} died, was killed or lost its connection"
        return text + (f" (reported by {reporter})" if reporter else "")

    def _fail(self, role: int, index: int, cause: int, reporter: str) -> None:
        """Called with ``cond`` held: the job is ending; wake everyone waiting."""
        if self.failure is None and self.finished_at is None:
            self.failure = (role, index, cause, reporter)
            self.failed_at = time.monotonic()
            log.error("%s: %s; every role stops", self.name, self._failure_text())
        self.cond.notify_all()

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

    def _status_reply(self, ok: Message) -> Message:
        """FAILED or DONE when the job is over, else ``ok`` (call without ``cond`` held)."""
        with self.cond:
            if self.failure is not None:
                role, index, cause, _ = self.failure
                return Message(P.FAILED, (role, index, cause))
            if self.finished_at is not None:
                return Message(P.DONE, (self.version,))
        return ok

    # ------------------------------------------------------------------ requests
    def _serve_request(self, peer: Peer, client: Client) -> Message:
        """Read one request, checking it before its tensors are read and before it acts; its reply."""
        op, numbers, specs = peer.recv_header(self.timeout)
        if op not in P.RULES:
            raise BadMessage(P.UNKNOWN_OP, f"unknown request {op}")
        roles, count = P.RULES[op]
        name = P.REQUEST_NAMES[op]
        if client.role not in roles:
            raise BadMessage(P.NOT_ALLOWED, f"{name} is not allowed from {role_name(client.role, client.index)}")
        if len(numbers) != count:
            raise BadMessage(P.BAD_NUMBERS, f"{name} with {len(numbers)} numbers, not {count}")
        layout = ShardLayout.from_numbers(self.cfg, self.cluster, self.index, numbers) if op == P.INIT else None
        expected = self._expected_tensors(op, layout)
        if len(specs) != len(expected) or any(
                dtype != want_dtype or numel not in lengths for (dtype, numel), (want_dtype, lengths) in zip(specs,
                                                                                                          expected)):
            raise BadMessage(P.BAD_TENSORS, f"{name} with tensors {show_specs(specs)}; this ps takes "
                                            f"{show_specs(expected)}")
        tensors = peer.recv_tensors(specs, self.timeout)
        if op == P.PUSH:
            check_values(tensors[0], P.MAX_GRADIENT, "the gradient")
            check_values(tensors[1], P.MAX_BUFFER, "the buffers")
        for i, t in enumerate(tensors if op == P.INIT else ()):
            check_values(t, math.inf, ("the parameters", "the buffers")[i] if i < 2 else "the optimizer state")
        return self._answer(peer.number, client, Message(op, numbers, tensors), layout)

    def _expected_tensors(self, op: int, layout: ShardLayout | None) -> list[tuple[torch.dtype, set[int]]]:
        """(dtype, allowed lengths) of each tensor request ``op`` must carry to this shard."""
        if layout is not None:
            return [(dtype, {numel}) for dtype, numel in layout.specs()]
        if op != P.PUSH:
            return []
        with self.cond:  # before INIT a push can only be empty (a skipped step)
            params = self.store.param_count if self.store is not None else 0
            buffers = self.store.buffers.numel() if self.store is not None else 0
        return [(torch.float32, {0, params}), (torch.float64, {0, buffers})]

    def _answer(self, link: int, client: Client, msg: Message, layout: ShardLayout | None = None) -> Message:
        op = msg.op
        if op == P.PING:
            return self._status_reply(Message(P.OK))
        if op == P.BYE:
            client.said_bye = True
            return Message(P.OK)
        if op == P.ABORT:
            role = whole(msg.numbers[0], PS, EVALUATOR, "ABORT role")
            count = {PS: self.cluster.num_ps, CHIEF: 1, WORKER: self.cluster.num_workers, EVALUATOR: 1}[role]
            index = whole(msg.numbers[1], 0, count - 1, "ABORT index")
            reporter = role_name(client.role, client.index, self.cluster)
            with self.cond:
                self._fail(role, index, P.REPORTED, reporter)
            return self._status_reply(Message(P.OK))
        if op == P.STATS:
            return self._stats()
        if op == P.SCORED:
            step = whole(msg.numbers[0], -1, MAX_NUMEL, "SCORED step")
            with self.cond:
                self.scored_step = max(self.scored_step, step)
            return self._status_reply(Message(P.OK))
        if op == P.FINISH:
            with self.cond:
                if self.failure is None and self.finished_at is None:
                    self.finished_at = time.monotonic()
                    log.info("%s: the chief finished at update %d", self.name, self.version)
                self.cond.notify_all()
            return Message(P.OK)
        if op == P.INIT:
            return self._init(layout, msg.tensors)
        if op == P.SNAPSHOT:
            return self._snapshot()
        if op == P.PULL:
            return self._pull(link, client, bool(whole(msg.numbers[0], 0, 1, "PULL admission flag")))
        if op == P.PUSH:
            return self._push(link, client, msg)
        raise BadMessage(P.UNKNOWN_OP, f"unknown request {op}")

    def _wait_initialised(self) -> Message | None:
        with self.cond:
            self.cond.wait_for(lambda: self.initialised or self.failure is not None or self.finished_at is not None,
                               timeout=max(self.timeout / 4, 0.5))
            if self.failure is None and self.finished_at is None and not self.initialised:
                return Message(P.RETRY)
        return None

    def _pull(self, link: int, client: Client, admit: bool) -> Message:
        retry = self._wait_initialised()
        if retry is not None:
            return retry
        with self.cond:
            if self.version >= self.total_steps and self.failure is None:
                return Message(P.DONE, (self.version,))
        if admit and self.bound >= 0 and not self._admit(link, client):
            return self._status_reply(Message(P.RETRY))
        with self.cond:
            params = self.store.flat_params()
            client.base = self.store.buffers.clone()
            version = self.version
        return self._status_reply(Message(P.OK, (version,), (params, client.base)))

    def _admissible(self, client: Client) -> bool:
        """Whether letting ``client`` pull now keeps every gradient at most ``bound`` updates stale."""
        pulled = [c.pulled_at for c in self.clients.values() if c.outstanding and c is not client]
        n = len(pulled)
        return n <= self.bound and all(self.version - v + n <= self.bound for v in pulled)

    def _admit(self, link: int, client: Client) -> bool:
        """Wait, first come first served, until ``client`` may pull (see the module docstring)."""
        with self.cond:
            if client.outstanding:
                return True
            self.queue.append(link)
            try:
                ok = self.cond.wait_for(
                    lambda: self.failure is not None or self.finished_at is not None or self.version >= self.total_steps
                    or (self.queue[0] == link and self._admissible(client)), timeout=max(self.timeout / 4, 0.5))
            finally:
                self.queue.remove(link)
                self.cond.notify_all()
            if ok and self.failure is None and self.finished_at is None and self.version < self.total_steps:
                client.outstanding, client.pulled_at = True, self.version
                return True
            return False

    def _leave(self, client: Client) -> None:
        """``client`` pushed (or left): it no longer counts against the staleness bound."""
        if client.outstanding:
            client.outstanding = False
            self.cond.notify_all()

    def _push(self, link: int, client: Client, msg: Message) -> Message:
        pulled = whole(msg.numbers[0], 0, MAX_NUMEL, "PUSH pulled version")
        leave, then_pull, admit = (whole(v, 0, 1, "PUSH flag") for v in msg.numbers[1:4])
        grads, buffers = msg.tensors
        retry = self._wait_initialised()
        if retry is not None:
            return retry
        with self.cond:
            if grads.numel() and (grads.numel() != self.store.param_count or pulled > self.version):
                raise BadMessage(P.BAD_NUMBERS, f"a gradient of {grads.numel()} values pulled at update {pulled}; "
                                                f"the shard has {self.store.param_count} at update {self.version}")
            if self.failure is None and self.finished_at is None and self.version < self.total_steps:
                self.store.merge_buffers(buffers, client.base)
                if grads.numel():
                    self.staleness[min(self.version - pulled, P.STALENESS_BINS - 1)] += 1
                    self.store.apply(grads, self.version)
                    self.version += 1
                    if client.worker is not None:
                        self.updates[client.worker] += 1
            if leave:
                self._leave(client)
            version = self.version
            over = version >= self.total_steps
        if over:
            return self._status_reply(Message(P.DONE, (version,)))
        if then_pull:
            return self._pull(link, client, bool(admit))
        return self._status_reply(Message(P.OK, (version,)))

    def _init(self, layout: ShardLayout, tensors: tuple[torch.Tensor, ...]) -> Message:
        store = ShardStore.from_init(layout, tensors)
        step, stamp = layout.step, layout.run_stamp
        with self.cond:
            self.store, self.version, self.total_steps, self.run_stamp = store, step, store.total_steps, stamp
            self.initialised = True
            self.cond.notify_all()
        log.info("%s: %d parameter tensors (%.2f M values), %d state values, from update %d of %d", self.name,
                 len(store.params), sum(p.numel() for p in store.params) / 1e6, store.buffers.numel(), step,
                 store.total_steps)
        return Message(P.OK)

    def _snapshot(self) -> Message:
        retry = self._wait_initialised()
        if retry is not None:
            return retry
        with self.cond:
            params, buffers, version = self.store.flat_params(), self.store.buffers.clone(), self.version
            mask, state = self.store.optimizer_state()
        return Message(P.OK, (version, mask), (params, buffers, *state))

    def _stats(self) -> Message:
        with self.cond:
            if self.failure is not None:
                return Message(P.FAILED, self.failure[:3])
            numbers = (self.version, self.total_steps, int(self.finished_at is not None), int(self.evaluator_seen),
                       self.scored_step, self.run_stamp, int(self.initialised))
            tensors = (torch.tensor(self.staleness, dtype=torch.int64), torch.tensor(self.updates, dtype=torch.int64),
                       torch.tensor(self.workers_alive, dtype=torch.int64), torch.tensor(self.joins, dtype=torch.int64),
                       torch.tensor(self.losses, dtype=torch.int64))
        return Message(P.OK, numbers, tensors)


def run_ps(cfg: TrainConfig, cluster: Cluster) -> dict:
    """Serve as ``--ps-index`` until the job ends."""
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    return ParameterServer(cfg, cluster, cfg.ps_index).serve()
