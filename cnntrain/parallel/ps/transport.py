"""One link between a client and a parameter server: one TCP connection carrying request/reply frames.

Each ps listens on its own ``--ps-hosts`` address; a client connects from the address it is given
(``--worker-hosts``), so a link uses the interfaces named in the cluster. ``Wire`` moves the frames
of ``frames`` over the connection, every call within its timeout; ``Link`` is the client's end
(``request`` sends and waits for the reply), ``Peer`` the server's end once ``listener`` has read
its HELLO.

One connection per link keeps the faults simple: a client that dies breaks only its own link (the
ps reads "connection closed" at once), a restarted client just connects again, and a dead ps shows
up on every client's next request.

Earlier versions ran a two-rank gloo group per link over a c10d ``TCPStore``. It was given up
because one peer could end the job with one message: gloo aborts the whole process (``enforce
fail ... op.preamble.length <= op.nbytes``, torch 2.14) when a message is longer than the receive
posted for it, and the store's link numbers let a client that died between taking a number and
announcing it stall every later link. ``torch.distributed.rpc`` was tried before that and is not
used: under dynamic membership a restarted worker cannot rejoin under its old name.
``Listener``/``Peer`` (server side) and ``Link`` (client side) are the whole interface the rest of
the package uses, so another transport fits in this file and ``listener``.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable

import torch

from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.frames import (
    HEADER_BYTES,
    BadMessage,
    LinkError,
    Message,
    Spec,
    decode_header,
    encode_header,
)
from cnntrain.parallel.ps.frames import MAX_NUMEL as MAX_NUMEL  # store.py takes these two from here
from cnntrain.parallel.ps.frames import whole as whole

HANDSHAKE_S = 5.0  # a connection must send its HELLO this soon after it is accepted


class GaveUp(LinkError):
    """``Link.connect`` stopped waiting because its ``stop`` condition came true."""


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


class Wire:
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

    def __init__(self, name: str, wire: Wire, timeout: float, nonce: tuple[int, ...]) -> None:
        self.name = name
        self.timeout = timeout
        self.nonce = nonce
        self._wire: Wire | None = wire
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
            wire = Wire(sock)
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

    def __init__(self, number: int, wire: Wire, addr: str, nonce: tuple[int, ...], first: Message,
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

