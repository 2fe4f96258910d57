"""HandshakeGate: accepts a socket backend's connections and runs their handshakes on one
thread, so a connection gets a thread of its own only once it has proven itself.

Theory of operation
-------------------
::

    listening socket --accept--> pending (non-blocking socket, deadline, parser,
                                  ServerHandshake, bytes to send)     one selector thread
        readable: bytes -> [prefix] -> Connection -> HELLO/AUTH -> handshake -> replies
        done, replies sent  -> blocking socket handed to ``ready`` (a serve thread)
        refused, reply sent -> closed
        past hello_timeout  -> closed
        more than max_handshakes -> the oldest that sent nothing (else the oldest) closed

What a pending connection may hold is bounded: its parser refuses a body larger than
MAX_HANDSHAKE_BODY, and at most ``max_handshakes`` are pending, so 10,000 idle or slow
connections cost one thread and a few MiB however long they stay. A prefix (nccl's
rendezvous key) is read before the first frame.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import KvxferError, RemoteProtocolError
from ..logs import get_logger
from ..protocol import E_PROTOCOL, NEED_DATA, Connection, Error
from ..protocol.connection import DEFAULT_MAX_BODY, DEFAULT_MAX_PAYLOAD
from ..protocol.handshake import ServerHandshake

log = get_logger("kvxfer.gate")

MAX_HANDSHAKE_BODY = 1 << 20  # a HELLO's descriptor of a few hundred layers fits easily
READ_SIZE = 64 << 10
TICK = 0.25  # seconds between looks at deadlines when nothing happens
ACCEPT_BATCH = 64  # connections accepted per turn of the loop
LINGER = 1.0  # seconds a refused connection is given to read the refusal and close

# (blocking socket, its parser with what came after the handshake, the finished
# handshake, the prefix) -> serve it.
Ready = Callable[[socket.socket, Connection, ServerHandshake, bytes], None]


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    deadline: float
    handshake: ServerHandshake
    conn: Connection = field(default_factory=lambda: Connection(max_body=MAX_HANDSHAKE_BODY,
                                                                max_payload=0))
    prefix: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    got: int = 0  # bytes received so far
    lingering: bool = False  # refused, our side shut: waiting for the peer to close


class HandshakeGate:
    """Accepts on ``lsock`` and hands each connection that finished its handshake to
    ``ready``; owns one thread (``start``/``stop``).

    Args:
        lsock: a listening socket (made non-blocking here).
        new_handshake: a fresh ServerHandshake per connection.
        ready: takes a connection that may be served (see :data:`Ready`).
        hello_timeout: seconds a connection has to finish its handshake.
        max_handshakes: connections handshaking at once; past it one is closed (the
            oldest that sent nothing, else the oldest).
        prefix_len: bytes the connecting side sends before its HELLO.
        name: for the thread's name.
    """

    def __init__(self, lsock: socket.socket, new_handshake: Callable[[], ServerHandshake],
                 ready: Ready, *, hello_timeout: float, max_handshakes: int,
                 prefix_len: int = 0, name: str = "") -> None:
        self.lsock = lsock
        self.new_handshake, self.ready = new_handshake, ready
        self.hello_timeout, self.max_handshakes = hello_timeout, max_handshakes
        self.prefix_len = prefix_len
        self._sel = selectors.DefaultSelector()
        self._pending: dict[socket.socket, _Pending] = {}  # insertion order: oldest first
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"kvxfer-gate[{name}]")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self.lsock.setblocking(False)
        self._sel.register(self.lsock, selectors.EVENT_READ)
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self.thread.start()

    def stop(self) -> threading.Thread:
        """Stop accepting and close every pending connection; returns the thread to join."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        return self.thread

    # -------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, events in self._sel.select(self._timeout()):
                    if key.fileobj is self.lsock:
                        self._accept()
                    elif key.fileobj is not self._wake_r:
                        p = self._pending.get(key.fileobj)  # type: ignore[call-overload]
                        if p is not None:  # (not closed earlier in this round)
                            self._step(p, events)
                self._expire()
        except Exception:  # noqa: BLE001 - a bug of ours: say so; close() still joins us
            log.exception("the handshake loop failed; no new peers are accepted")
        finally:
            for p in list(self._pending.values()):
                self._drop(p)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _timeout(self) -> float:
        if not self._pending:
            return TICK
        first = min(p.deadline for p in self._pending.values())
        return max(0.0, min(TICK, first - time.monotonic()))

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):  # then back to select: read who has spoken
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds, say: keep serving those we have
                log.warning("cannot accept a connection: %s", exc)
                return
            while len(self._pending) >= self.max_handshakes:
                self._drop(self._victim())
            sock.setblocking(False)
            p = _Pending(sock, time.monotonic() + self.hello_timeout, self.new_handshake())
            self._pending[sock] = p
            self._sel.register(sock, selectors.EVENT_READ)

    def _victim(self) -> _Pending:
        """Who goes when too many handshake at once: the oldest that has sent nothing
        (a peer that is really connecting sends its HELLO at once; bytes that are
        waiting unread count as sent), else the oldest whose HELLO has not come whole,
        else the oldest."""
        log.debug("too many connections handshaking: closing one")
        no_hello = None
        for p in self._pending.values():
            if not p.got and not self._has_bytes(p.sock):
                return p
            if no_hello is None and not p.handshake.heard:
                no_hello = p
        return no_hello or next(iter(self._pending.values()))

    @staticmethod
    def _has_bytes(sock: socket.socket) -> bool:
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return True  # (reset: its turn comes in the loop)

    def _expire(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            log.debug("a connection did not finish its handshake within %.1f s: closed",
                      self.hello_timeout)
            self._drop(p)

    def _drop(self, p: _Pending) -> None:
        self._pending.pop(p.sock, None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        p.sock.close()

    def _step(self, p: _Pending, events: int) -> None:
        if p.lingering:  # refused: wait for the peer to close, discarding its bytes
            try:
                if not p.sock.recv(READ_SIZE):
                    self._drop(p)
            except BlockingIOError:
                pass
            except OSError:
                self._drop(p)
            return
        try:
            if events & selectors.EVENT_READ and not p.handshake.finished:
                self._read(p)
            if p.out:
                p.out = p.out[p.sock.send(p.out):]
        except BlockingIOError:
            pass
        except (OSError, KvxferError) as exc:
            log.debug("a connection failed during its handshake: %s", exc)
            self._drop(p)
            return
        if p.out:  # wait for room to send the rest
            self._sel.modify(p.sock, selectors.EVENT_WRITE)
        elif p.handshake.refused is not None:
            (log.warning if p.handshake.code is not None else log.debug)(
                "refused a connection from %r: %s", p.handshake.peer, p.handshake.refused)
            # Closing with the peer's bytes unread would reset the connection, and the
            # refusal could be lost: end our side, and let the peer close (LINGER at most).
            p.lingering = True
            p.deadline = min(p.deadline, time.monotonic() + LINGER)
            self._sel.modify(p.sock, selectors.EVENT_READ)
            try:
                p.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop(p)
        elif not p.handshake.done:
            self._sel.modify(p.sock, selectors.EVENT_READ)  # the peer's turn
        else:
            self._pending.pop(p.sock)
            self._sel.unregister(p.sock)
            p.sock.setblocking(True)
            p.conn.max_body, p.conn.max_payload = DEFAULT_MAX_BODY, DEFAULT_MAX_PAYLOAD
            self.ready(p.sock, p.conn, p.handshake, bytes(p.prefix))

    def _read(self, p: _Pending) -> None:
        data = p.sock.recv(READ_SIZE)
        p.got += len(data)
        if not data:
            p.handshake.refused = "the peer closed the connection during the handshake"
            return
        need = self.prefix_len - len(p.prefix)
        if need > 0:
            p.prefix += data[:need]
            data = data[need:]
            if not data:  # b"" would tell the parser the stream ended
                return
        p.conn.receive_data(data)
        while not p.handshake.finished:
            try:
                ev = p.conn.next_event()
            except RemoteProtocolError as exc:
                p.handshake.refused = str(exc)
                p.out += Connection(expect_hello=False).encode(Error(0, 0, E_PROTOCOL, str(exc)))
                return
            if ev is NEED_DATA:
                return
            for frame in p.handshake.on_event(ev):
                p.out += p.conn.encode(frame)
