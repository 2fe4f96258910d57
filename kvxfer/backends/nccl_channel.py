"""NcclChannel: kvxfer frames on a TCP socket, their payloads on two-rank process groups.

Theory of operation
-------------------
One connection is one TCP socket plus a :class:`DataPlane` of two ``torch.distributed``
process groups, each of two ranks (the serving side is rank 0, the connecting side
rank 1) and each carrying payloads one way only::

    connecting side (rank 1)                          serving side (rank 0)
    socket: key(16 bytes) HELLO ------------------->  reads the key, then HELLO
            <------------------------------------ HELLO
    established(): form "c2s" then "s2c" on the serving side's TCPStore under the key,
                   one warm-up byte each way (both groups are connected before
                   add_peer returns, and a group that cannot form fails it)
    frame:  socket <- header + body (exactly; the reader never reads past a frame)
            c2s    <- its payload (one packed staging buffer) as send(tag = n)
    peer:   socket -> header + body; c2s -> recv(tag = n) into its staging buffer

- Each group is used by one thread on each side and in frame order: a payload follows
  its header, and the receiver posts its receive once it has read that header. Gloo
  matches by tag (the n-th payload of a direction carries tag n), NCCL ignores tags and
  matches in posting order, which is the same order; one group per direction keeps an
  NCCL send on one side from queueing behind a receive on the same stream.
- Every chunk is staged (packed into one buffer), since a process group moves one
  tensor per message: a host buffer for Gloo, a device buffer for NCCL (packed there
  by the packing kernel, never staged through the host).
- Waits are bounded by the backend's ``payload_timeout``: Gloo takes it as the wait's
  timeout (a timed-out Gloo pair is closed, so the connection ends), NCCL is polled
  (``is_completed``, which never blocks or synchronises) until done, shut down or past
  it, and then aborted. A dead peer closes the group's sockets: waits fail at once.
  ``shutdown`` cannot wake a blocked Gloo wait (neither ``abort`` nor ``shutdown`` of
  ProcessGroupGloo does); it ends when the peer closes its end or at the bound.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import PeerUnreachable
from ..logs import get_logger
from ..protocol import HEADER_SIZE, NEED_DATA, Connection, Event
from ..protocol.frames import HEADER
from .channel import Abandoned, Channel, Guard
from .sockio import send_buffers, shutdown_socket

log = get_logger("kvxfer.nccl")

KEY_BYTES = 16  # the connecting side's rendezvous key, first on the socket
TAG_SPACE = 1 << 31  # Gloo tags are non-negative 32-bit ints
POLL_MAX = 1e-3  # longest sleep between looks at a pending NCCL operation

# (key, control socket) -> the connection's DataPlane, formed with the peer.
FormPlane = Callable[[bytes, socket.socket], "DataPlane"]


def _nbytes(buf: object) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return memoryview(buf).nbytes  # type: ignore[arg-type]


def as_tensor(buf: object) -> torch.Tensor:
    """A uint8 tensor over ``buf`` (a staging tensor, or a memoryview of one): no copy."""
    if isinstance(buf, torch.Tensor):
        return buf.view(torch.uint8).reshape(-1)
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]
    if not view.nbytes:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


class DataPlane:
    """The payloads of one connection: an outbound and an inbound two-rank group.

    Args:
        outbound: the group whose sends go to the peer (only ever sent on here).
        inbound: the group the peer sends on (only ever received on here).
        peer_rank: the peer's rank in both.
        timeout: seconds a payload may take once its frame is on the wire.
        device: where payload buffers live: a CUDA device for NCCL, the CPU for Gloo.
    """

    def __init__(self, outbound: Any, inbound: Any, peer_rank: int, timeout: float,
                 device: torch.device) -> None:
        self._out: Any = outbound
        self._in: Any = inbound
        self._peer = peer_rank
        self.timeout = timeout
        self.device = device
        self.nccl = device.type == "cuda"  # ProcessGroupNCCL: polled, aborted
        self._sent = 0  # payloads sent (one sending thread)
        self._received = 0  # payloads received (one receiving thread)
        self.down: Optional[str] = None  # why the plane is unusable; set once

    def send(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` to the peer; returns once it has left our buffer."""
        tag, self._sent = self._sent % TAG_SPACE, self._sent + 1
        self._run(lambda pg: pg.send([tensor], self._peer, tag), self._out, "send")

    def recv(self, tensor: torch.Tensor) -> None:
        """Fill ``tensor`` with the peer's next payload."""
        tag, self._received = self._received % TAG_SPACE, self._received + 1
        self._run(lambda pg: pg.recv([tensor], self._peer, tag), self._in, "receive")

    def _run(self, post: Callable[[Any], Any], pg: Any, what: str) -> None:
        if self.down is not None or pg is None:
            raise PeerUnreachable(f"the process group is down: {self.down or 'closed'}")
        try:
            work = post(pg)
            if self.nccl:
                self._poll(work, what)
            elif not work.wait(datetime.timedelta(seconds=self.timeout)):
                raise RuntimeError(f"the {what} was aborted")
        except PeerUnreachable:
            raise
        except RuntimeError as exc:  # Gloo and NCCL report a dead peer or a timeout so
            self.down = self.down or str(exc).splitlines()[0]
            raise PeerUnreachable(f"process group {what} failed: {self.down}") from exc

    def _poll(self, work: Any, what: str) -> None:
        """Wait for an NCCL operation without blocking the stream or the device."""
        deadline, spins = time.monotonic() + self.timeout, 0
        while not work.is_completed():
            if self.down is not None or time.monotonic() > deadline:
                why = self.down or f"no progress within {self.timeout} s"
                self.abort()
                raise PeerUnreachable(f"NCCL {what} did not complete: {why}")
            spins += 1
            time.sleep(0 if spins < 64 else min(POLL_MAX, 2e-5 * (spins - 63)))
        if not work.is_success():
            raise RuntimeError(f"NCCL {what} failed")

    def abort(self) -> None:
        """NCCL: abort both communicators (a new connection builds new ones)."""
        if not self.nccl:
            return
        for pg in (self._out, self._in):
            try:
                if pg is not None:
                    pg.abort()
            except Exception as exc:  # noqa: BLE001 - aborting a broken communicator
                log.debug("aborting an NCCL communicator: %s", exc)

    def close(self) -> None:
        """Destroy both groups (their sockets or communicators go with them). Idempotent."""
        self.down = self.down or "closed"
        if self.nccl:
            self.abort()
        self._out = self._in = None


class NcclChannel(Channel):
    """One peer connection: frames on ``sock``, payloads on a :class:`DataPlane`.

    Args:
        sock: the connected control socket.
        key: the rendezvous key (the connecting side makes it and sends it first; the
            serving side's handshake loop reads it before the peer's HELLO).
        form: makes this connection's DataPlane with the peer, given the key and the
            socket; called by :meth:`established`.
        conn: the parser, holding what came after the handshake (serving side).
    """

    def __init__(self, sock: socket.socket, key: bytes, form: FormPlane,
                 conn: Optional[Connection] = None) -> None:
        self.sock = sock
        self.key = key
        self._form = form
        self.conn = conn if conn is not None else Connection()
        self.plane: Optional[DataPlane] = None
        self._lock = threading.Lock()  # plane and closed (close vs. established)
        self._closed = False

    # ---------------------------------------------------------------- set-up
    def established(self) -> None:
        """The HELLO exchange succeeded: form the process groups with the peer."""
        plane = self._form(self.key, self.sock)
        with self._lock:
            if not self._closed:
                self.plane, plane = plane, None  # type: ignore[assignment]
        if plane is not None:  # closed while forming
            plane.close()
            raise PeerUnreachable("the connection closed while its process groups formed")

    def _recv_exact(self, n: int) -> Optional[bytearray]:
        """Exactly ``n`` bytes from the socket; None at a clean end before the first."""
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                if got == 0:
                    return None
                raise PeerUnreachable("peer closed the connection inside a frame")
            got += k
        return out

    def _plane(self) -> DataPlane:
        if self.plane is None:
            raise PeerUnreachable("the connection has no process groups (not established "
                                  "or closed)")
        return self.plane

    # --------------------------------------------------------------- Channel
    def send(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> None:
        head, payload = buffers[0], [b for b in buffers[1:] if _nbytes(b)]
        if len(payload) > 1:
            raise ValueError("the nccl channel carries a payload as one staged buffer")
        if guard is None:
            self._send_frame(head, payload)
            return
        with guard.data_lock:  # the group reads the buffer until the send completes
            if not guard.active:
                raise Abandoned(0)
            self._send_frame(head, payload)

    def _send_frame(self, head: object, payload: list[object]) -> None:
        plane = self._plane() if payload else None
        send_buffers(self.sock, [head])
        if plane is not None:
            plane.send(as_tensor(payload[0]))

    def next_event(self) -> Event:
        ev = self.conn.next_event()
        if ev is not NEED_DATA:
            return ev
        header = self._recv_exact(HEADER_SIZE)
        self.conn.receive_data(header if header is not None else b"")
        ev = self.conn.next_event()  # raises RemoteProtocolError on a bad header
        if ev is NEED_DATA:
            body = self._recv_exact(HEADER.unpack(header)[4])  # type: ignore[arg-type]
            if body is None:
                raise PeerUnreachable("peer closed the connection inside a frame")
            self.conn.receive_data(body)
            ev = self.conn.next_event()
        return ev

    def recv_payload(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> bool:
        """Receive the payload into one staging buffer (ours: the caller unpacks it into
        KV memory under its own guard, so ``guard`` is not needed here)."""
        tensors = [t for t in map(as_tensor, buffers) if t.numel()]
        n = self.conn.payload_remaining
        if not tensors and not n:
            return True
        if len(tensors) != 1 or tensors[0].numel() != n:
            raise ValueError("the nccl channel receives a payload into one staged buffer "
                             "of the payload's size")
        self._plane().recv(tensors[0])
        self.conn.payload_received_elsewhere(n)
        return True

    def drain_payload(self) -> None:
        n = self.conn.payload_remaining
        if n:
            plane = self._plane()
            scratch = torch.empty(n, dtype=torch.uint8, device=plane.device)
            plane.recv(scratch)  # a payload is taken whole, then dropped
            self.conn.payload_received_elsewhere(n)

    def set_timeout(self, seconds: Optional[float]) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        """Wake threads blocked on the socket and mark the groups down (NCCL: abort)."""
        shutdown_socket(self.sock)
        plane = self.plane
        if plane is not None and plane.down is None:
            plane.down = "closed by this side"
            plane.abort()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            plane, self.plane = self.plane, None
        if plane is not None:
            plane.close()
        self.sock.close()
