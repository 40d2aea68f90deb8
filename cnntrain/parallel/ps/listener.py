"""A ps's listening socket and the handshakes under way on it, up to each link's HELLO.

The ps trusts nothing a peer sends (see README, "Threat model"). Its first frame on every link is a
random nonce (``CHALLENGE``); ``Listener`` answers every connection from one thread, holds at most a
fixed header's bytes for each until its HELLO has arrived, drops a connection silent for
``HANDSHAKE_S`` (or the oldest once ``max_pending`` wait), and hands out a ``Peer`` only with a
well-formed HELLO in hand. After that the server reads each header first (``Peer.recv_header``),
checks it against the role and the shard, and only then reads and allocates the tensors.
"""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from cnntrain.errors import DistributedError
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.frames import HEADER_BYTES, BadMessage, Message, decode_header, encode_header
from cnntrain.parallel.ps.transport import HANDSHAKE_S, Peer, Wire


def address(sock: socket.socket) -> str:
    """``host:port`` of the other end (``?`` once it is gone)."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        peer = Peer(self._next, Wire(pending.sock), pending.addr, pending.nonce, Message(op, numbers),
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
