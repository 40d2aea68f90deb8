"""Request/reply messages between one client and one parameter server, on c10d point-to-point.

A message is an op code, up to 12 plain numbers and up to 8 flat tensors; nothing else crosses the
wire (no pickles, no strings). Each ps listens with a c10d ``TCPStore`` on a socket bound to its own
``--ps-hosts`` address. A client takes a link number from that store, and both ends build a
two-rank gloo group under the number's key prefix, with gloo's sockets bound to their given
hosts; messages then travel as gloo ``send``/``recv`` on that pair.

One group per link is what makes the faults simple: a client that dies breaks only its own pair
(the ps reads "connection closed" at once), a restarted client just takes a new number, and a
dead ps shows up on every client's next request.

``torch.distributed.rpc`` was tried first and is not used: under dynamic membership a restarted
worker cannot rejoin under its old name ("RPC worker name ... is not unique", torch 2.14), and a
server cannot see a client die. ``Listener``/``Peer`` (server side) and ``Link`` (client side) are
the whole interface the rest of the package uses, so another transport fits in this one file.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnntrain.errors import DistributedError

MAGIC = 20261123.0  # first header slot: a message from this protocol version
MAX_NUMBERS = 12
MAX_TENSORS = 8
HEADER = 4 + MAX_NUMBERS + 2 * MAX_TENSORS  # magic, op, #numbers, #tensors, numbers, (dtype, numel) pairs
DTYPES = (torch.float32, torch.float64, torch.int64)
_LONG = datetime.timedelta(days=1)  # gloo's own default wait; every wait here passes its timeout


@dataclass
class Message:
    op: int
    numbers: tuple[float, ...] = ()
    tensors: tuple[torch.Tensor, ...] = ()


class LinkError(DistributedError):
    """The other end of a link died, closed it, or did not answer within the timeout."""


class GaveUp(LinkError):
    """``wait_reachable`` stopped waiting because its ``stop`` condition came true."""


def encode_header(msg: Message) -> torch.Tensor:
    if len(msg.numbers) > MAX_NUMBERS or len(msg.tensors) > MAX_TENSORS:
        raise ValueError(f"message {msg.op}: at most {MAX_NUMBERS} numbers and {MAX_TENSORS} tensors")
    header = torch.zeros(HEADER, dtype=torch.float64)
    header[:4] = torch.tensor([MAGIC, msg.op, len(msg.numbers), len(msg.tensors)], dtype=torch.float64)
    if msg.numbers:
        header[4:4 + len(msg.numbers)] = torch.tensor([float(n) for n in msg.numbers], dtype=torch.float64)
    for i, t in enumerate(msg.tensors):
        header[4 + MAX_NUMBERS + 2 * i] = DTYPES.index(t.dtype)
        header[5 + MAX_NUMBERS + 2 * i] = t.numel()
    return header


def decode_header(header: torch.Tensor) -> tuple[int, tuple[float, ...], list[tuple[torch.dtype, int]]]:
    """(op, numbers, [(dtype, numel)] of the tensors that follow)."""
    values = header.tolist()
    if values[0] != MAGIC:
        raise LinkError("a message that is not from this version of cnntrain arrived; are all roles running "
                        "the same cnntrain?")
    n_numbers, n_tensors = int(values[2]), int(values[3])
    specs = [(DTYPES[int(values[4 + MAX_NUMBERS + 2 * i])], int(values[5 + MAX_NUMBERS + 2 * i]))
             for i in range(n_tensors)]
    return int(values[1]), tuple(values[4:4 + n_numbers]), specs


def _gloo_options(host: str, timeout: float) -> dist.ProcessGroupGloo._Options:
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]  # bind to this interface only
    options._timeout = datetime.timedelta(seconds=timeout)
    return options


def _pair(store: dist.Store, number: int, rank: int, host: str, timeout: float) -> dist.ProcessGroupGloo:
    return dist.ProcessGroupGloo(dist.PrefixStore(f"link/{number}/", store), rank, 2, _gloo_options(host, timeout))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text or "EOF" in text:
        return "connection closed"
    if "imed out" in text or "imeout" in text:
        return "no answer (timed out)"
    return text[:200]


class _Wire:
    """Messages over one two-rank gloo group; ``rank`` is this end, the other is ``1 - rank``."""

    def __init__(self, group: dist.ProcessGroupGloo, rank: int) -> None:
        self.group = group
        self.other = 1 - rank

    def send(self, msg: Message, timeout: float) -> None:
        wait = datetime.timedelta(seconds=timeout)
        self.group.send([encode_header(msg)], self.other, 0).wait(wait)
        for t in msg.tensors:
            if t.numel():
                self.group.send([t.detach().contiguous()], self.other, 0).wait(wait)

    def recv(self, timeout: float) -> Message:
        header = torch.empty(HEADER, dtype=torch.float64)
        self.group.recv([header], self.other, 0).wait(datetime.timedelta(seconds=timeout))
        op, numbers, specs = decode_header(header)
        tensors = []
        for dtype, numel in specs:
            t = torch.empty(numel, dtype=dtype)
            if numel:
                self.group.recv([t], self.other, 0).wait(datetime.timedelta(seconds=timeout))
            tensors.append(t)
        return Message(op, numbers, tuple(tensors))


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def wait_reachable(host: str, port: int, timeout: float, what: str, stop: Callable[[], bool] | None = None) -> None:
    """Wait until something listens at ``host:port`` (a plain TCP connect, then closed), so the
    store client below connects at once instead of logging a retry trace per attempt. Raises
    ``GaveUp`` as soon as ``stop()`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout, 0.1))):
                return
        except OSError as exc:
            if stop is not None and stop():
                raise GaveUp(f"{what}: stopped waiting") from None
            if time.monotonic() >= deadline:
                raise LinkError(f"{what} is not reachable within {timeout:.0f} s (--dist-timeout): "
                                f"{exc.strerror or exc}; is it started, and are host and port right?") from None
            time.sleep(0.2)


class Link:
    """The client end of a link to one parameter server: ``request`` sends and waits for the reply.

    ``start_heartbeat`` pings the server while the link is otherwise idle (the server takes a link
    silent for longer than the timeout to be dead)."""

    def __init__(self, name: str, wire: _Wire, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self._wire = wire
        self._lock = threading.Lock()
        self._last_used = time.monotonic()
        self._broken: str | None = None
        self._stop = threading.Event()

    @classmethod
    def connect(cls, host: str, port: int, *, local_host: str, timeout: float, name: str,
                stop: Callable[[], bool] | None = None) -> Link:
        """Connect to the server listening at ``host:port``; gloo binds to ``local_host`` here.

        With ``stop``, a server that goes away while the link is being built (it was ending just as
        this process came up) is waited for again, so ``stop()`` decides: ``GaveUp`` once it is true."""
        deadline = time.monotonic() + timeout
        while True:
            wait_reachable(host, port, max(deadline - time.monotonic(), 0.0), name, stop)
            try:
                store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout),
                                      wait_for_workers=False)
                number = store.add("links", 1)
                store.set(f"link/{number}", b"1")  # the server builds its end when it sees this key
                group = _pair(store, number, 1, local_host, timeout)
            except Exception as exc:  # noqa: BLE001 - c10d raises several types for the same cause
                if stop is None or time.monotonic() >= deadline or _listening(host, port):
                    raise LinkError(f"could not open a link to {name}: {_describe(exc)}") from None
                continue  # the server is gone: wait for it (or for stop) again
            return cls(name, _Wire(group, 1), timeout)

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        with self._lock:
            if self._broken:
                raise LinkError(f"{self.name}: {self._broken}")
            try:
                self._wire.send(msg, timeout or self.timeout)
                reply = self._wire.recv(timeout or self.timeout)
            except LinkError:
                raise
            except Exception as exc:  # noqa: BLE001 - gloo errors arrive as RuntimeError / DistError
                self._broken = _describe(exc)
                raise LinkError(f"{self.name}: {self._broken}") from None
            finally:
                self._last_used = time.monotonic()
            return reply

    def start_heartbeat(self, ping: Message) -> None:
        interval = max(self.timeout / 4, 0.5)

        def beat() -> None:
            while not self._stop.wait(interval / 2):
                if time.monotonic() - self._last_used < interval or not self._lock.acquire(blocking=False):
                    continue
                self._lock.release()
                try:
                    self.request(ping)
                except LinkError:
                    return  # the next request from the main thread raises it

        self._beat = threading.Thread(target=beat, name=f"heartbeat {self.name}", daemon=True)
        self._beat.start()

    def close(self) -> None:
        """Stop the heartbeat and drop the gloo pair now (not at interpreter exit, where its
        destructor can abort the process)."""
        self._stop.set()
        beat = getattr(self, "_beat", None)
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=self.timeout)
        with self._lock:
            self._broken = self._broken or "closed"
            self._wire = None


class Peer:
    """The server end of one link (one client connection)."""

    def __init__(self, number: int, store_addr: tuple[str, int], host: str, timeout: float) -> None:
        self.number = number
        self._store_addr = store_addr
        self._host = host
        self._timeout = timeout
        self._wire: _Wire | None = None

    def open(self) -> None:
        """Build this end of the pair (blocks until the client's end is there too)."""
        host, port = self._store_addr
        try:
            store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=self._timeout),
                                  wait_for_workers=False)
            self._wire = _Wire(_pair(store, self.number, 0, self._host, self._timeout), 0)
        except Exception as exc:  # noqa: BLE001
            raise LinkError(f"link {self.number}: {_describe(exc)}") from None

    def recv(self, timeout: float) -> Message:
        try:
            return self._wire.recv(timeout)
        except LinkError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise LinkError(_describe(exc)) from None

    def send(self, msg: Message) -> None:
        try:
            self._wire.send(msg, self._timeout)
        except Exception as exc:  # noqa: BLE001
            raise LinkError(_describe(exc)) from None

    def close(self) -> None:
        """Drop the gloo pair now, in this thread (at interpreter exit its destructor can abort)."""
        self._wire = None


class Listener:
    """A ps's listening end: a TCPStore on a socket bound to ``host:port`` (that interface only)."""

    def __init__(self, host: str, port: int, timeout: float, name: str) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
            self._sock.listen(128)
        except OSError as exc:
            self._sock.close()
            if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise DistributedError(f"{name}: port {port} on {host} is already in use by another process; "
                                       f"pick a free one in --ps-hosts (or --dist-start-port)") from None
            raise DistributedError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            self._store = dist.TCPStore(host, port, None, True, datetime.timedelta(seconds=timeout),
                                        wait_for_workers=False, master_listen_fd=self._sock.fileno())
        except Exception as exc:  # noqa: BLE001
            self._sock.close()
            raise DistributedError(f"{name}: cannot serve on {host}:{port}: {_describe(exc)}") from None
        self._sock.detach()  # the store owns the listening socket now, and closes it
        self._next = 1

    def accept(self) -> Peer | None:
        """The next client that asked for a link, or None when none is waiting."""
        if not self._store.check([f"link/{self._next}"]):
            return None
        peer = Peer(self._next, (self.host, self.port), self.host, self.timeout)
        self._next += 1
        return peer

    def close(self) -> None:
        self._store = None
