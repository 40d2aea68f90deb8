"""The links of one chief, worker or evaluator to the parameter servers, and the requests it makes.

Each link starts with the HELLO: who this is, the config fingerprint and the cluster's shape, and
the proof that this process holds the job's ps token (``protocol.proof`` over the ps's nonce; the
token is ``ps_token`` in the config, else ``$CNNTRAIN_PS_TOKEN``, else none on every role).

A lost ps ends this process with a ``DistributedError`` naming that ps; before exiting the chief
tells the other ps (ABORT), so every role of the job learns which process died. A FAILED reply ends
it naming the process the ps reports dead, a REFUSED reply naming what the ps refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.errors import DistributedError
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.cluster import (
    CHIEF,
    EVALUATOR,
    PS,
    Cluster,
    ShardPlan,
    config_fingerprint,
    flatten,
    role_name,
    unflatten_into,
)
from cnntrain.parallel.ps.frames import LinkError, Message
from cnntrain.parallel.ps.transport import GaveUp, Link

log = logging.getLogger("cnntrain")
JOB_STARTED_ENV = "CNNTRAIN_ASYNC_PS_STARTED"  # set by the local launcher for its children


@dataclass
class Stats:
    """What ps 0 knows about the whole job."""

    version: int
    total_steps: int
    finished: bool
    evaluator: bool
    scored_step: int
    run_stamp: int
    initialised: bool
    staleness: list[int]
    updates: list[int]
    alive: list[bool]
    joins: list[int]
    losses: list[int]


def local_address(host: str, port: int) -> str:
    """The address of this machine's interface that routes to ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class PsClient:
    def __init__(self, cfg: TrainConfig, cluster: Cluster, role: int, index: int,
                 ps_indices: list[int] | None = None, *, token: str | None = None) -> None:
        """``token``: the job's ps token (default: ``ps_token`` in ``cfg``, else ``$CNNTRAIN_PS_TOKEN``)."""
        self.cfg = cfg
        self.token = P.job_token(cfg) if token is None else token
        self.cluster = cluster
        self.role = role
        self.index = index
        self.me = role_name(role, index, cluster)
        self.ps_indices = ps_indices if ps_indices is not None else list(range(cluster.num_ps))
        self.links: dict[int, Link] = {}
        self.bounded = cfg.max_staleness >= 0
        self.pulled = [0] * cluster.num_ps
        self.params: list[list[torch.Tensor]] = []
        self.buffers: list[list[torch.Tensor]] = []
        self._pool = ThreadPoolExecutor(cluster.num_ps) if cluster.num_ps > 1 else None

    # ------------------------------------------------------------------ links
    def connect(self, stop: Callable[[], bool] | None = None) -> int:
        """Open a link to each ps and say who this is; returns the run stamp ps 0 knows (0: none yet).

        Raises ``GaveUp`` if ``stop()`` comes true while a ps is not reachable yet."""
        stamp = 0
        for k in self.ps_indices:
            host, port = self.cluster.ps[k]
            local = self.cluster.workers[self.index] if self.role != EVALUATOR else local_address(host, port)
            name = self.cluster.ps_name(k)
            try:
                link = Link.connect(host, port, local_host=local, timeout=self.cfg.dist_timeout, name=name, stop=stop)
            except GaveUp:
                raise
            except LinkError as exc:
                raise DistributedError(f"{self.me}: {exc}") from None
            self.links[k] = link
            identity = (self.role, self.index, config_fingerprint(self.cfg), self.cluster.num_workers,
                        self.cluster.num_ps, k)
            hello = Message(P.HELLO, (*identity, *P.proof(self.token, link.nonce, identity)))
            reply = self._request(k, hello, refused_is_error=False)
            if reply.op == P.REFUSED:
                raise DistributedError(f"{self.me}: {name} refused the connection: {self._refusal(reply, k)}")
            link.start_heartbeat(Message(P.PING))
            if k == 0:
                stamp = int(reply.numbers[2])
        return stamp

    def _refusal(self, reply: Message, k: int) -> str:
        reason = int(reply.numbers[0])
        if reason == P.BAD_CONFIG:
            return ("its training options differ from this process's (every role needs the same model, data and "
                    "optimizer options)")
        if reason == P.BAD_CLUSTER:
            return (f"it belongs to a cluster of {int(reply.numbers[1])} workers and {int(reply.numbers[2])} ps, "
                    f"this process to {self.cluster.num_workers} and {self.cluster.num_ps}")
        if reason == P.WRONG_PS:
            return f"it is ps {int(reply.numbers[1])}, not ps {k}: --ps-hosts lists them in another order there"
        if reason == P.BAD_TOKEN:
            return (f"bad token: every role of the job needs the same ps token (ps_token in the config, or "
                    f"${P.TOKEN_ENV}; a job started by one command makes its own)")
        if reason == P.BUSY:
            return f"it serves {int(reply.numbers[1])} links already (the most it takes); try again later"
        if reason == P.BAD_MESSAGE:
            return self._problem(reply)
        return f"{role_name(self.role, self.index)} is already connected (a second process with the same index?)"

    @staticmethod
    def _problem(reply: Message) -> str:
        detail = int(reply.numbers[1]) if len(reply.numbers) > 1 else -1
        return P.PROBLEMS[detail] if 0 <= detail < len(P.PROBLEMS) else "a malformed message"

    def _request(self, k: int, msg: Message, *, check: bool = True, refused_is_error: bool = True) -> Message:
        try:
            reply = self.links[k].request(msg)
        except LinkError as exc:
            self._abort_others(k)
            raise DistributedError(f"{self.me}: {self.cluster.ps_name(k)} died or is unreachable "
                                   f"({str(exc).split(': ', 1)[-1]}); stopping") from None
        if refused_is_error and reply.op == P.REFUSED:
            self.links[k].close()
            why = self._problem(reply) if reply.numbers and int(reply.numbers[0]) == P.BAD_MESSAGE else "refused"
            raise DistributedError(f"{self.me}: {self.cluster.ps_name(k)} refused a {P.REQUEST_NAMES.get(msg.op)} "
                                   f"request from this process ({why}) and closed the link; stopping")
        if check and reply.op == P.FAILED:
            role, index, cause = (int(v) for v in reply.numbers[:3])
            who = role_name(role, index, self.cluster)
            if cause == P.NEVER_CONNECTED:
                why = f"{who} never connected to {self.cluster.ps_name(k)} within --dist-timeout"
            else:
                why = f"{who} died, was killed or lost its connection (as {self.cluster.ps_name(k)} reports)"
            raise DistributedError(f"{self.me}: {why}; stopping")
        return reply

    def _abort_others(self, dead: int) -> None:
        """As the chief, tell the other ps that ps ``dead`` is gone (best effort), so every role stops
        naming it (only the chief may end the job this way; the others learn it from the ps)."""
        if self.role != CHIEF:
            return
        for k, link in self.links.items():
            if k != dead:
                with contextlib.suppress(LinkError):
                    link.request(Message(P.ABORT, (PS, dead)), timeout=min(5.0, self.cfg.dist_timeout))

    def _each(self, ks: list[int], fn) -> list:
        if self._pool is None or len(ks) <= 1:
            return [fn(k) for k in ks]
        return list(self._pool.map(fn, ks))

    def close(self, goodbye: bool = True) -> None:
        """Stop the heartbeats; with ``goodbye``, tell every ps still there that this was no crash."""
        for link in self.links.values():
            if goodbye:
                with contextlib.suppress(LinkError):
                    link.request(Message(P.BYE), timeout=min(5.0, self.cfg.dist_timeout))
            link.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ training
    def bind(self, model: nn.Module, plan: ShardPlan) -> None:
        """Pull into / push from ``model``'s own tensors, split as ``plan`` says."""
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.params = [[params[plan.param_names[i]] for i in plan.params_of(k)] for k in range(self.cluster.num_ps)]
        self.buffers = [[buffers[plan.buffer_names[i]] for i in plan.buffers_of(k)]
                        for k in range(self.cluster.num_ps)]

    def _copy_in(self, k: int, reply: Message) -> None:
        self.pulled[k] = int(reply.numbers[0])
        params, buffers = reply.tensors
        with torch.no_grad():
            unflatten_into(params, self.params[k])
            unflatten_into(buffers, self.buffers[k])

    def _pull_one(self, k: int, admit: bool) -> Message:
        while True:
            reply = self._request(k, Message(P.PULL, (int(admit),)))
            if reply.op != P.RETRY:
                break
        if reply.op == P.OK:
            self._copy_in(k, reply)
        return reply

    def _push_one(self, k: int, skipped: bool, then_pull: bool, bounded: bool) -> Message:
        if skipped:
            grads, buffers = torch.empty(0), torch.empty(0, dtype=torch.float64)
        else:
            grads = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params[k]])
            buffers = flatten(self.buffers[k], torch.float64)
        reply = self._request(k, Message(P.PUSH, (self.pulled[k], int(bounded), int(then_pull), int(bounded)),
                                         (grads, buffers)))
        while reply.op == P.RETRY:  # pushed; only the pull that follows it waits
            reply = self._request(k, Message(P.PULL, (int(bounded),)))
        if then_pull and reply.op == P.OK:
            self._copy_in(k, reply)
        return reply

    def pull(self) -> tuple[bool, int]:
        """Current weights and buffers into the model; (training over, ps 0's version)."""
        rest = [k for k in range(self.cluster.num_ps) if k != 0]
        first = self._pull_one(0, self.bounded)
        replies = [first, *self._each(rest, lambda k: self._pull_one(k, False))]
        return self._outcome(replies)

    def push_pull(self, skipped: bool = False) -> tuple[bool, int]:
        """Push this step's gradient and buffers, pull the new weights; (training over, ps 0's version).

        Unbounded: one request per ps, all at once. With --max-staleness: push to ps 1.., then push to
        ps 0 (which lets this worker pull again when the bound allows), then pull ps 1.., so ps 0's
        order holds on every shard."""
        rest = [k for k in range(self.cluster.num_ps) if k != 0]
        if not self.bounded:
            replies = self._each(list(range(self.cluster.num_ps)), lambda k: self._push_one(k, skipped, True, False))
            return self._outcome(replies)
        pushed = self._each(rest, lambda k: self._push_one(k, skipped, False, False))
        if any(r.op == P.DONE for r in pushed):
            return True, self.pulled[0]
        first = self._push_one(0, skipped, True, True)
        if first.op == P.DONE:
            return True, int(first.numbers[0]) if first.numbers else self.pulled[0]
        return self._outcome([first, *self._each(rest, lambda k: self._pull_one(k, False))])

    def _outcome(self, replies: list[Message]) -> tuple[bool, int]:
        done = any(r.op == P.DONE for r in replies)
        version = int(replies[0].numbers[0]) if replies[0].numbers else self.pulled[0]
        return done, version

    # ------------------------------------------------------------------ chief and evaluator
    def init(self, model: nn.Module, plan: ShardPlan, numbers: tuple[float, ...],
             optimizer_state: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Send each ps its shard of ``model`` (and of a resumed optimizer state)."""
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        keys = P.STATE_KEYS[self.cfg.optimizer]
        for k in range(self.cluster.num_ps):
            names = [plan.param_names[i] for i in plan.params_of(k)]
            mask, state = 0, []
            for i, key in enumerate(keys):
                per_param = (optimizer_state or {}).get(key, {})
                if names and all(n in per_param for n in names):
                    mask |= 1 << i
                    state.append(flatten([per_param[n] for n in names]))
            tensors = (flatten([params[n] for n in names]),
                       flatten([buffers[plan.buffer_names[i]] for i in plan.buffers_of(k)], torch.float64), *state)
            self._request(k, Message(P.INIT, (*numbers, mask), tensors))

    def snapshot(self, plan: ShardPlan) -> tuple[int, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(ps 0's version, parameters and buffers by name, optimizer state by key and name) from every ps."""
        values: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        version = 0
        keys = P.STATE_KEYS[self.cfg.optimizer]
        for k in range(self.cluster.num_ps):
            reply = self._request(k, Message(P.SNAPSHOT))
            if k == 0:
                version = int(reply.numbers[0])
            mask = int(reply.numbers[1])
            params, buffers, *flats = reply.tensors
            p_idx, b_idx = plan.params_of(k), plan.buffers_of(k)
            values.update(_split(params, [plan.param_names[i] for i in p_idx], [plan.param_shapes[i] for i in p_idx]))
            values.update(_split(buffers, [plan.buffer_names[i] for i in b_idx],
                                 [plan.buffer_shapes[i] for i in b_idx]))
            present = [key for i, key in enumerate(keys) if mask >> i & 1]
            for key, flat in zip(present, flats):
                shapes = [() if key == "step" else plan.param_shapes[i] for i in p_idx]
                state.setdefault(key, {}).update(_split(flat, [plan.param_names[i] for i in p_idx], shapes))
        return version, values, state

    def stats(self) -> Stats:
        reply = self._request(0, Message(P.STATS))
        n = reply.numbers
        hist, updates, alive, joins, losses = (t.tolist() for t in reply.tensors)
        return Stats(int(n[0]), int(n[1]), bool(n[2]), bool(n[3]), int(n[4]), int(n[5]), bool(n[6]), hist, updates,
                     [bool(a) for a in alive], joins, losses)

    def scored(self, step: int) -> None:
        self._request(0, Message(P.SCORED, (step,)), check=False)

    def finish(self) -> None:
        for k in range(self.cluster.num_ps):
            self._request(k, Message(P.FINISH), check=False)

    def wait_for_stamp(self, poll: float = 0.5) -> int:
        """The chief's run stamp once it has initialised ps 0 (names the run folder)."""
        while True:
            st = self.stats()
            if st.initialised or st.finished:
                return st.run_stamp
            time.sleep(poll)


def run_finished(cfg: TrainConfig) -> Callable[[], bool] | None:
    """A test for "this run finished after this job started" (a new summary.json in ``--run-dir``;
    the job's start is the launcher's, else now): a role that comes up after the end then need not
    wait out ``--dist-timeout``."""
    if not cfg.run_dir:
        return None
    marker = Path(cfg.run_dir) / "summary.json"
    started = float(os.environ.get(JOB_STARTED_ENV) or time.time())

    def finished() -> bool:
        try:
            return marker.stat().st_mtime >= started
        except OSError:
            return False

    return finished


def _split(flat: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[offset:offset + n].view(shape).clone()
        offset += n
    return out
