"""Request/reply messages between one client and one parameter server, over one TCP connection.

A message is an op code, up to 16 plain numbers and up to 8 flat tensors; nothing else crosses the
wire (no pickles, no strings). A frame is a fixed header of ``HEADER`` little-endian float64 values
(magic, op, #numbers, #tensors, the numbers, then a (dtype, length) pair per tensor) followed by the
tensors' raw bytes (the host's byte order: every machine torch supports today is little-endian).
Each ps listens on its own ``--ps-hosts`` address; a client connects from the address it is given
(``--worker-hosts``), so a link uses the interfaces named in the cluster.

One connection per link keeps the faults simple: a client that dies breaks only its own link (the
ps reads "connection closed" at once), a restarted client just connects again, and a dead ps shows
up on every client's next request.

The ps trusts nothing a peer sends (see README, "Threat model"). Its first frame on every link is a
random nonce (``CHALLENGE``); ``Listener`` answers every connection from one thread, holds at most a
fixed header's bytes for each until its HELLO has arrived, drops a connection silent for
``HANDSHAKE_S`` (or the oldest once ``max_pending`` wait), and hands out a ``Peer`` only with a
well-formed HELLO in hand. After that the server reads each header first (``Peer.recv_header``),
checks it against the role and the shard, and only then reads and allocates the tensors.

Earlier versions ran a two-rank gloo group per link over a c10d ``TCPStore``. It was given up
because one peer could end the job with one message: gloo aborts the whole process (``enforce
fail ... op.preamble.length <= op.nbytes``, torch 2.14) when a message is longer than the receive
posted for it, and the store's link numbers let a client that died between taking a number and
announcing it stall every later link. ``torch.distributed.rpc`` was tried before that and is not
used: under dynamic membership a restarted worker cannot rejoin under its old name.
``Listener``/``Peer`` (server side) and ``Link`` (client side) are the whole interface the rest of
the package uses, so another transport fits in this one file.
"""

from __future__ import annotations

import collections
import errno
import math
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cnntrain.errors import DistributedError
from cnntrain.parallel.ps import protocol as P

MAGIC = 20270301.0  # first header slot: a message from this protocol version (TCP frames, HELLO proof)
MAX_NUMBERS = 16
MAX_TENSORS = 8
HEADER = 4 + MAX_NUMBERS + 2 * MAX_TENSORS
HEADER_BYTES = 8 * HEADER
_HEADER_FORMAT = f"<{HEADER}d"
DTYPES = (torch.float32, torch.float64, torch.int64)
MAX_NUMEL = 2**53  # the largest length a float64 header slot holds exactly
HANDSHAKE_S = 5.0  # a connection must send its HELLO this soon after it is accepted


@dataclass
class Message:
    op: int
    numbers: tuple[float, ...] = ()
    tensors: tuple[torch.Tensor, ...] = ()


class LinkError(DistributedError):
    """The other end of a link died, closed it, or did not answer within the timeout."""


class GaveUp(LinkError):
    """``Link.connect`` stopped waiting because its ``stop`` condition came true."""


class BadMessage(LinkError):
    """A message that breaks the protocol's rules; ``problem`` is one of ``protocol.PROBLEMS``."""

    def __init__(self, problem: int, text: str) -> None:
        super().__init__(text)
        self.problem = problem


Spec = tuple[torch.dtype, int]


def whole(value: float, lo: int, hi: int, what: str) -> int:
    """``value`` as an int if it is a whole number in ``[lo, hi]``, else ``BadMessage`` naming ``what``."""
    if not (math.isfinite(value) and value == int(value) and lo <= value <= hi):
        raise BadMessage(P.BAD_NUMBERS, f"{what} {value!r} is not a whole number in {lo}..{hi}")
    return int(value)


def check_values(t: torch.Tensor, limit: float, what: str) -> None:
    """``BadMessage`` unless every value of ``t`` is finite and at most ``limit`` in magnitude."""
    if not t.numel():
        return
    largest = t.abs().max().item()  # NaN if any value is NaN
    if not math.isfinite(largest):
        raise BadMessage(P.NOT_FINITE, f"NaN or infinite values in {what}")
    if largest > limit:
        raise BadMessage(P.NOT_FINITE, f"a value of magnitude {largest:.3g} in {what}, beyond {limit:g}")


def show_specs(specs) -> str:
    """Tensor specs for a message: 'float32[61706], float64[0 or 12]' (lengths: an int or a set)."""
    if not specs:
        return "no tensors"
    parts = []
    for dtype, lengths in specs:
        lengths = sorted(lengths) if isinstance(lengths, set) else [lengths]
        parts.append(f"{str(dtype).removeprefix('torch.')}[{' or '.join(map(str, lengths))}]")
    return ", ".join(parts)


def encode_header(msg: Message) -> bytes:
    if len(msg.numbers) > MAX_NUMBERS or len(msg.tensors) > MAX_TENSORS:
        raise ValueError(f"message {msg.op}: at most {MAX_NUMBERS} numbers and {MAX_TENSORS} tensors")
    values = [0.0] * HEADER
    values[:4] = [MAGIC, msg.op, len(msg.numbers), len(msg.tensors)]
    values[4:4 + len(msg.numbers)] = [float(n) for n in msg.numbers]
    for i, t in enumerate(msg.tensors):
        values[4 + MAX_NUMBERS + 2 * i] = DTYPES.index(t.dtype)
        values[5 + MAX_NUMBERS + 2 * i] = t.numel()
    return struct.pack(_HEADER_FORMAT, *values)


def _count(value: float, limit: int, what: str) -> int:
    if not (math.isfinite(value) and value == int(value) and 0 <= value <= limit):
        raise BadMessage(P.MALFORMED, f"{what} {value!r} in the header")
    return int(value)


def decode_header(data: bytes) -> tuple[int, tuple[float, ...], list[Spec]]:
    """(op, numbers, [(dtype, length)] of the tensors that follow); ``BadMessage`` if it is not a
    header of this version (nothing here allocates more than the header itself)."""
    values = struct.unpack(_HEADER_FORMAT, data)
    if values[0] != MAGIC:
        raise BadMessage(P.MALFORMED, "a message that is not from this version of cnntrain arrived; are all roles "
                                      "running the same cnntrain?")
    op = _count(values[1], 2**31, "op")
    n_numbers = _count(values[2], MAX_NUMBERS, "number count")
    n_tensors = _count(values[3], MAX_TENSORS, "tensor count")
    numbers = values[4:4 + n_numbers]
    if not all(math.isfinite(n) for n in numbers):
        raise BadMessage(P.NOT_FINITE, "a number that is NaN or infinite")
    specs = [(DTYPES[_count(values[4 + MAX_NUMBERS + 2 * i], len(DTYPES) - 1, "dtype")],
              _count(values[5 + MAX_NUMBERS + 2 * i], MAX_NUMEL, "tensor length")) for i in range(n_tensors)]
    return op, tuple(numbers), specs


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer (timed out)"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "connection closed"
    if isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
        return "connection closed"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def address(sock: socket.socket) -> str:
    """``host:port`` of the other end (``?`` once it is gone)."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Wire:
    """Frames over one connected, blocking socket. Every call finishes within its ``timeout`` or
    raises; a closed or reset connection raises ``EOFError`` / ``OSError`` (callers say which)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small request, one small reply

    def _read(self, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError
            got += n

    def _write(self, data, deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        self.sock.sendall(data)

    def send(self, msg: Message, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._write(encode_header(msg), deadline)
        for t in msg.tensors:
            if t.numel():
                self._write(_bytes_of(t.detach().cpu().contiguous()), deadline)

    def recv_header(self, timeout: float) -> tuple[int, tuple[float, ...], list[Spec]]:
        data = bytearray(HEADER_BYTES)
        self._read(memoryview(data), time.monotonic() + timeout)
        return decode_header(bytes(data))

    def recv_tensors(self, specs: list[Spec], timeout: float) -> tuple[torch.Tensor, ...]:
        deadline = time.monotonic() + timeout
        tensors = []
        for dtype, numel in specs:
            t = torch.empty(numel, dtype=dtype)
            if numel:
                self._read(_bytes_of(t), deadline)
            tensors.append(t)
        return tuple(tensors)

    def recv(self, timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        op, numbers, specs = self.recv_header(timeout)
        return Message(op, numbers, self.recv_tensors(specs, max(deadline - time.monotonic(), 0.001)))

    def close(self) -> None:
        self.sock.close()


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


class Link:
    """The client end of a link to one parameter server: ``request`` sends and waits for the reply.

    ``nonce`` is the ps's challenge for this link (the HELLO proves the token with it).
    ``start_heartbeat`` pings the server while the link is otherwise idle (the server takes a link
    silent for longer than the timeout to be dead)."""

    def __init__(self, name: str, wire: _Wire, timeout: float, nonce: tuple[int, ...]) -> None:
        self.name = name
        self.timeout = timeout
        self.nonce = nonce
        self._wire: _Wire | None = wire
        self._lock = threading.Lock()
        self._last_used = time.monotonic()
        self._broken: str | None = None
        self._stop = threading.Event()

    @classmethod
    def connect(cls, host: str, port: int, *, local_host: str, timeout: float, name: str,
                stop: Callable[[], bool] | None = None) -> Link:
        """Connect to the server listening at ``host:port`` from ``local_host``, and read its challenge.

        Waits up to ``timeout`` for the server to listen. With ``stop``, a server that goes away
        while the link is being opened (it was ending just as this process came up) is waited for
        again, so ``stop()`` decides: ``GaveUp`` once it is true."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=min(5.0, max(timeout, 0.1)),
                                                source_address=(local_host, 0))
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL) and not isinstance(exc, socket.gaierror):
                    raise LinkError(f"cannot connect to {name} from {local_host}: {exc.strerror or exc} (is it an "
                                    f"address of this machine? --worker-hosts names it)") from None
                if stop is not None and stop():
                    raise GaveUp(f"{name}: stopped waiting") from None
                if time.monotonic() >= deadline:
                    raise LinkError(f"{name} is not reachable within {timeout:.0f} s (--dist-timeout): "
                                    f"{exc.strerror or exc}; is it started, and are host and port right?") from None
                time.sleep(0.2)
                continue
            wire = _Wire(sock)
            wait = max(deadline - time.monotonic(), HANDSHAKE_S)
            try:
                op, numbers, specs = wire.recv_header(wait)
            except TimeoutError:
                wire.close()
                raise LinkError(f"could not open a link to {name}: it accepted the connection but sent no challenge "
                                f"within {wait:.0f} s (another program on that port, or another cnntrain "
                                f"version?)") from None
            except (LinkError, OSError, EOFError) as exc:
                wire.close()
                if stop is None or time.monotonic() >= deadline or _listening(host, port):
                    raise LinkError(f"could not open a link to {name}: {_describe(exc)}") from None
                continue  # the server is gone: wait for it (or for stop) again
            if op != P.CHALLENGE or len(numbers) != P.NONCE_WORDS or specs:
                wire.close()
                raise LinkError(f"could not open a link to {name}: it does not speak this protocol (another "
                                f"program on that port, or another cnntrain version?)")
            return cls(name, wire, timeout, tuple(int(n) for n in numbers))

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        with self._lock:
            if self._broken:
                raise LinkError(f"{self.name}: {self._broken}")
            try:
                self._wire.send(msg, timeout or self.timeout)
                return self._wire.recv(timeout or self.timeout)
            except BadMessage:
                self._broken = "sent a malformed reply"
                raise LinkError(f"{self.name}: {self._broken}") from None
            except Exception as exc:  # noqa: BLE001 - socket errors come as several types for one cause
                self._broken = _describe(exc)
                raise LinkError(f"{self.name}: {self._broken}") from None
            finally:
                self._last_used = time.monotonic()

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
        """Stop the heartbeat and close the connection."""
        self._stop.set()
        beat = getattr(self, "_beat", None)
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=self.timeout)
        with self._lock:
            self._broken = self._broken or "closed"
            if self._wire is not None:
                self._wire.close()
            self._wire = None


class Peer:
    """The server end of one link whose HELLO (``first``) has arrived; ``nonce`` is the challenge
    it answered. ``recv_header`` then ``recv_tensors`` let the server check a request before its
    tensors are read."""

    def __init__(self, number: int, wire: _Wire, addr: str, nonce: tuple[int, ...], first: Message,
                 timeout: float) -> None:
        self.number = number
        self.address = addr
        self.nonce = nonce
        self.first = first
        self._wire = wire
        self._timeout = timeout

    def _guard(self, call, *args):
        try:
            return call(*args)
        except LinkError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise LinkError(_describe(exc)) from None

    def recv_header(self, timeout: float) -> tuple[int, tuple[float, ...], list[Spec]]:
        return self._guard(self._wire.recv_header, timeout)

    def recv_tensors(self, specs: list[Spec], timeout: float) -> tuple[torch.Tensor, ...]:
        return self._guard(self._wire.recv_tensors, specs, timeout)

    def recv(self, timeout: float) -> Message:
        return self._guard(self._wire.recv, timeout)

    def send(self, msg: Message, timeout: float | None = None) -> None:
        self._guard(self._wire.send, msg, timeout or self._timeout)

    def close(self) -> None:
        self._wire.close()


@dataclass
class _Pending:
    sock: socket.socket
    addr: str
    nonce: tuple[int, ...]
    deadline: float
    header: bytearray
    got: int = 0


class Listener:
    """A ps's listening socket, bound to ``host:port`` (that interface only), and the handshakes
    under way on it: ``accept`` returns the next connection that sent a well-formed HELLO.

    ``warn(text)`` is told of each connection refused for what it sent; connections that only
    went quiet, closed or were pushed out by newer ones are counted in ``dropped`` instead (a
    port scan or a flood would otherwise fill the log)."""

    def __init__(self, host: str, port: int, timeout: float, name: str, *, max_pending: int = 256,
                 handshake_s: float = HANDSHAKE_S, warn: Callable[[str], None] | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.max_pending, self.handshake_s = max_pending, handshake_s
        self._warn = warn or (lambda text: None)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
            self._sock.listen(socket.SOMAXCONN)  # a burst of connections waits here, not in SYN retries
        except OSError as exc:
            self._sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise DistributedError(f"{name}: port {port} on {host} is already in use by another process; "
                                       f"pick a free one in --ps-hosts (or --dist-start-port)") from None
            raise DistributedError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._pending: collections.OrderedDict[socket.socket, _Pending] = collections.OrderedDict()
        self._ready: collections.deque[Peer] = collections.deque()
        self._next = 1
        self.dropped = 0  # connections closed before a HELLO without saying anything wrong
        self.last_dropped = ""

    @property
    def handshaking(self) -> int:
        """Connections accepted whose HELLO has not been handed out yet."""
        return len(self._pending) + len(self._ready)

    def accept(self, wait: float = 0.0) -> Peer | None:
        """The next connection with its HELLO read, or None when none is ready within ``wait`` s."""
        if not self._ready and self._sock is not None:
            for key, _ in self._selector.select(timeout=wait):
                if key.fileobj is self._sock:
                    self._take_new()
                elif key.fileobj in self._pending:
                    self._read(self._pending[key.fileobj])
            now = time.monotonic()
            while self._pending:
                oldest = next(iter(self._pending.values()))
                if oldest.deadline > now:
                    break
                self._drop(oldest)
        return self._ready.popleft() if self._ready else None

    def _take_new(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: leave the rest in the backlog for now
                return
            if len(self._pending) >= self.max_pending:
                self._drop(next(iter(self._pending.values())))
            nonce = P.new_nonce()
            challenge = encode_header(Message(P.CHALLENGE, nonce))
            sock.setblocking(False)
            pending = _Pending(sock, address(sock), nonce, time.monotonic() + self.handshake_s,
                               bytearray(HEADER_BYTES))
            try:
                sent = sock.send(challenge)  # a fresh socket's buffer holds it whole
            except OSError:
                sent = 0
            if sent != len(challenge):
                self._forget(pending, count=True)
                continue
            self._pending[sock] = pending
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, pending: _Pending) -> None:
        try:
            n = pending.sock.recv_into(memoryview(pending.header)[pending.got:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop(pending)
            return
        pending.got += n
        if pending.got < HEADER_BYTES:
            return
        self._selector.unregister(pending.sock)
        del self._pending[pending.sock]
        try:
            op, numbers, specs = decode_header(bytes(pending.header))
            if op != P.HELLO or specs:
                raise BadMessage(P.MALFORMED, f"its first message is request {op} with {len(specs)} tensor(s), "
                                              f"not a HELLO")
        except BadMessage as exc:
            self._warn(f"refused a link from {pending.addr} before its HELLO: {exc}")
            self._forget(pending, count=False)
            return
        peer = Peer(self._next, _Wire(pending.sock), pending.addr, pending.nonce, Message(op, numbers),
                    self.timeout)
        self._next += 1
        self._ready.append(peer)

    def _drop(self, pending: _Pending) -> None:
        self._selector.unregister(pending.sock)
        del self._pending[pending.sock]
        self._forget(pending, count=True)

    def _forget(self, pending: _Pending, *, count: bool) -> None:
        if count:
            self.dropped += 1
            self.last_dropped = pending.addr
        pending.sock.close()

    def close(self) -> None:
        """Stop listening and close every connection not handed out yet."""
        if self._sock is None:
            return
        for pending in list(self._pending.values()):
            self._selector.unregister(pending.sock)
            pending.sock.close()
        self._pending.clear()
        while self._ready:
            self._ready.popleft().close()
        self._selector.close()
        self._sock.close()
        self._sock = None
