"""A ps's answer to each request: checked against the sender's role and the shard, then applied.

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

Every request is checked before its tensors are read: the op against the sender's role
(``protocol.RULES``), its numbers, each tensor's type and exact length against the shard, then the
values (finite, and a gradient no larger than ``protocol.MAX_GRADIENT``). A request that breaks a
rule raises ``BadMessage`` before anything of it is applied; the link's thread (``server``) refuses
it. ``RequestHandler`` also holds the job's state every link shares (initialised, finished, failed),
all of it under ``cond``.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from cnntrain.config import TrainConfig
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.cluster import CHIEF, EVALUATOR, PS, WORKER, Cluster, role_name
from cnntrain.parallel.ps.frames import MAX_NUMEL, BadMessage, Message, check_values, show_specs, whole
from cnntrain.parallel.ps.store import ShardLayout, ShardStore
from cnntrain.parallel.ps.transport import Peer

log = logging.getLogger("cnntrain")


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


class RequestHandler:
    """This ps's shard, its update count and staleness bookkeeping, the job's state, and the answer
    to each request; ``server.ParameterServer`` adds the links that carry them."""

    def __init__(self, cfg: TrainConfig, cluster: Cluster, index: int) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.index = index
        self.name = cluster.ps_name(index)
        self.timeout = cfg.dist_timeout
        self.cond = threading.Condition()
        self.version = 0
        self.total_steps = 0
        self.initialised = False
        self.finished_at: float | None = None
        self.failure: tuple[int, int, int, str] | None = None  # role, index, cause, reporter
        self.failed_at: float | None = None
        self.run_stamp = 0
        self.clients: dict[int, Client] = {}  # open links by link number
        self.workers_alive = [False] * cluster.num_workers
        self.joins = [0] * cluster.num_workers
        self.losses = [0] * cluster.num_workers
        self.updates = [0] * cluster.num_workers
        self.staleness = [0] * P.STALENESS_BINS
        self.scored_step = -1
        self.evaluator_seen = False
        self.bound = cfg.max_staleness if index == 0 else -1  # -1: off
        self.queue: collections.deque[int] = collections.deque()
        self.store: ShardStore | None = None  # from the chief's INIT

    # ------------------------------------------------------------------ the job's state
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
