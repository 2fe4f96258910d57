"""Two-sided backends: one-sided reads and writes served over an ordered byte stream.

Theory of operation
-------------------
A transport (TCP socket, UCX stream endpoint) supplies a :class:`Channel`: an ordered,
reliable stream of kvxfer frames to one peer. Everything above it lives here, shared by
every two-sided backend. Each ``connect`` opens one channel to the peer, used for every
request from us to it; the peer serves it. Requests travel one way, answers the other::

    initiator (_ClientSide)                              target (_ServerSide)
    sender thread --READ(req, chunk, layers, runs)-----> serve thread: check ids,
                  --WRITE(...) + payload ------------->   send DATA + block views
    reader thread <--DATA + payload / COMPLETION-------   or receive into block views,
                  <--ERROR(req, chunk, why)------------   then COMPLETION

- Host memory moves with scatter-gather I/O straight between the channel and KV blocks;
  CUDA memory (or ``staged=True``) goes through one packed staging buffer per thread
  (a device buffer when the transport can move device memory, else pinned host).
- At most ``max_inflight`` chunks are outstanding per connection, so memory is bounded
  whatever the request size; the sender takes chunks round-robin across requests, so a
  small request waits for at most ``max_inflight`` chunks, not for a whole large one.
- The reader never sends and the sender never reads, so no two threads can wait on
  each other through full transport buffers.
- A dead channel fails every request on that connection at once; nothing waits longer
  than its deadline (the Agent enforces deadlines).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from typing import Optional, Protocol, Sequence

import torch

from ..errors import (AgentClosed, BlockOutOfRange, KvxferError, LayoutMismatch, PeerUnreachable,
                      ProtocolError, RemoteError, RemoteProtocolError)
from ..handle import TransferHandle
from ..memory import RegisteredMemory
from ..plan import Chunk
from ..protocol import (CLOSED, E_BACKLOG, E_LAYOUT, E_PROTOCOL, E_RANGE, E_SIZE, Close, Completion,
                        Connection, Data, Error, Event, Hello, ReadRequest, Write)
from .base import Backend, BackendConfig, BackendPeer, NotifySink, PeerInfo

log = logging.getLogger("kvxfer.twosided")


class Guard(Protocol):
    """What a channel needs of a transfer to stop touching engine memory (a TransferHandle)."""

    data_lock: threading.Lock

    @property
    def active(self) -> bool: ...


class Abandoned(Exception):
    """A guarded send found its transfer no longer active.

    Attributes:
        sent: bytes of the frame already sent (0: the frame can simply be skipped; more:
            the peer holds half a frame and only a reset of the connection is safe).
    """

    def __init__(self, sent: int) -> None:
        super().__init__(f"transfer abandoned after {sent} bytes of its frame were sent")
        self.sent = sent


class Channel(ABC):
    """An ordered, reliable stream of kvxfer frames to one peer (one transport connection).

    Failures of the transport raise ``OSError`` or :class:`PeerUnreachable`; a peer's
    malformed bytes raise :class:`RemoteProtocolError`.
    """

    @abstractmethod
    def send(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> None:
        """Send ``[header+body, *payload]`` as returned by ``Connection.send``.

        With a ``guard``, every transport call that reads the buffers runs under
        ``guard.data_lock`` and only while ``guard.active``; else it raises Abandoned.
        """

    @abstractmethod
    def next_event(self) -> Event:
        """The next frame from the peer (or CLOSED at a clean end of stream)."""

    @abstractmethod
    def recv_payload(self, buffers: Sequence[object]) -> None:
        """Fill ``buffers`` (together the current frame's payload) in order."""

    @abstractmethod
    def drain_payload(self) -> None:
        """Read and discard the rest of the current frame's payload."""

    @abstractmethod
    def set_timeout(self, seconds: Optional[float]) -> None:
        """Bound every later blocking call (None: no bound)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Wake every thread blocked on this channel; later calls fail. Idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Release the transport's resources (after ``shutdown``). Idempotent."""


class Staging:
    """A reusable contiguous buffer for packed chunks, grown on demand.

    Args:
        memory: the registered memory whose chunks are packed.
        device: where the buffer lives; None for the memory's host staging buffer
            (pinned when the KV cache is on a GPU).
    """

    def __init__(self, memory: RegisteredMemory, device: Optional[torch.device] = None) -> None:
        self.memory = memory
        self.device = device
        self.tensor: Optional[torch.Tensor] = None

    def get(self, nbytes: int) -> tuple[torch.Tensor, object]:
        """(tensor, buffer for the transport) of at least ``nbytes``."""
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.tensor = (self.memory.staging_buffer(nbytes) if self.device is None
                           else torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        if self.tensor.device.type == "cpu":
            return self.tensor, memoryview(self.tensor.numpy()).cast("B")[:nbytes]
        return self.tensor, self.tensor[:nbytes]

    def ready(self) -> None:
        """Wait until a pack into a device buffer has finished (a transport reads it next)."""
        if self.tensor is not None and self.tensor.device.type == "cuda":
            torch.cuda.current_stream(self.tensor.device).synchronize()


class TwoSidedBackend(Backend):
    """Base of backends that serve peers' requests over :class:`Channel` s.

    A subclass listens in ``_listen`` (calling :meth:`serve_channel` for each peer that
    connects), opens channels in ``_open_channel``, and stops and releases its transport
    in ``_stop_listening`` and ``_release``.
    """

    one_sided = False
    staging_device: Optional[torch.device] = None  # set by transports that move device memory

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        super().__init__(agent_name, listen, config)
        self._lock = threading.Lock()
        self._closed = False
        self._memory: Optional[RegisteredMemory] = None
        self._notify: Optional[NotifySink] = None
        self._servers: set[_ServerSide] = set()
        self._clients: list[_ClientSide] = []

    # -------------------------------------------------------- transport hooks
    @abstractmethod
    def _listen(self) -> None: ...

    @abstractmethod
    def _open_channel(self, peer: PeerInfo) -> Channel: ...

    def _stop_listening(self) -> list[threading.Thread]:
        """Stop accepting peers; returns threads to join."""
        return []

    def _release(self) -> None:
        """Free the transport once every channel thread has ended."""

    # ----------------------------------------------------------------- common
    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None:
        self._memory, self._notify = memory, notify
        self._listen()

    def serve_channel(self, channel: Channel) -> None:
        """Serve a peer that connected to us, on its own thread."""
        server = _ServerSide(self, channel)
        with self._lock:
            if self._closed:
                channel.shutdown()
                channel.close()
                return
            self._servers.add(server)
        server.thread.start()

    def connect(self, peer: PeerInfo) -> "_ClientSide":
        assert self._memory is not None, "start() first"
        channel = self._open_channel(peer)
        try:
            encoder = Connection(expect_hello=False)
            channel.set_timeout(self.config.connect_timeout)
            channel.send(encoder.send(Hello(self.agent_name, self._memory.descriptor_bytes)))
            reply = channel.next_event()
            if isinstance(reply, Error):
                if reply.code == E_LAYOUT:
                    raise LayoutMismatch(f"peer {peer.name!r} refused our layout: "
                                         f"{reply.message}")
                raise RemoteError(f"peer {peer.name!r} refused the connection: {reply.message}",
                                  reply.code)
            if not isinstance(reply, Hello):
                raise PeerUnreachable(f"peer {peer.name!r} closed the connection during hello")
            self._memory.check_peer(reply.descriptor)
            channel.set_timeout(None)
        except (OSError, ProtocolError) as exc:
            channel.shutdown()
            channel.close()
            raise PeerUnreachable(f"hello with peer {peer.name!r} failed: {exc}") from exc
        except BaseException:
            channel.shutdown()
            channel.close()
            raise
        client = _ClientSide(self, channel, encoder, peer.name)
        with self._lock:
            if self._closed:
                client.die(AgentClosed("agent closed"))
                raise AgentClosed("agent closed")
            self._clients.append(client)
        client.start()
        return client

    def submit(self, peer: BackendPeer, handle: TransferHandle) -> None:
        assert isinstance(peer, _ClientSide)
        peer.submit(handle)

    def _forget(self, server: "_ServerSide") -> None:
        with self._lock:
            self._servers.discard(server)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servers, clients = list(self._servers), list(self._clients)
        threads = self._stop_listening()
        for client in clients:
            client.die(AgentClosed("agent closed"))
        for server in servers:
            server.channel.shutdown()
        threads += [t for c in clients for t in c.threads] + [s.thread for s in servers]
        for t in threads:
            if t is not threading.current_thread() and t.ident is not None:
                t.join(timeout=10)
        for client in clients:
            client.channel.close()
        self._release()


class _ServerSide:
    """Serves one peer's requests on one accepted channel (its own thread)."""

    def __init__(self, backend: TwoSidedBackend, channel: Channel) -> None:
        self.backend = backend
        self.channel = channel
        self.memory: RegisteredMemory = backend._memory  # type: ignore[assignment]
        self.encoder = Connection(expect_hello=False)
        self.staging = Staging(self.memory, backend.staging_device)
        self.peer = "?"
        self.failed_requests: set[int] = set()  # writes with a refused chunk: no notify
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name=f"kvxfer-{backend.name}-serve[{backend.agent_name}]")

    def send(self, frame: object, payload: tuple = ()) -> None:
        self.channel.send(self.encoder.send(frame, payload))  # type: ignore[arg-type]

    def run(self) -> None:
        try:
            self.channel.set_timeout(self.backend.config.connect_timeout)
            hello = self.channel.next_event()
            if not isinstance(hello, Hello):
                raise RemoteProtocolError(f"expected HELLO, got {hello!r}")
            self.peer = hello.name
            try:
                self.memory.check_peer(hello.descriptor)
            except LayoutMismatch as exc:
                log.warning("refusing peer %r: %s", self.peer, exc)
                self.send(Error(0, 0, E_LAYOUT, str(exc)))
                return
            self.send(Hello(self.backend.agent_name, self.memory.descriptor_bytes))
            self.channel.set_timeout(None)
            self.serve()
        except RemoteProtocolError as exc:
            log.warning("protocol error from peer %r, closing its connection: %s", self.peer, exc)
            try:
                self.send(Error(0, 0, E_PROTOCOL, str(exc)))
            except (OSError, KvxferError):
                pass
        except (OSError, KvxferError) as exc:
            log.debug("connection from %r ended: %s", self.peer, exc)
        finally:
            self.channel.shutdown()
            self.channel.close()
            self.backend._forget(self)

    def serve(self) -> None:
        while True:
            ev = self.channel.next_event()
            if ev is CLOSED or isinstance(ev, Close):
                return
            if isinstance(ev, ReadRequest):
                self.serve_read(ev)
            elif isinstance(ev, Write):
                self.serve_write(ev)
            else:
                raise RemoteProtocolError(f"unexpected {type(ev).__name__} from a client")

    def serve_read(self, req: ReadRequest) -> None:
        try:
            nbytes = self.memory.check(req.layers, req.runs)
        except BlockOutOfRange as exc:
            self.send(Error(req.request_id, req.chunk, E_RANGE, str(exc)))
            return
        if self.memory.staged:
            tensor, view = self.staging.get(nbytes)
            self.memory.pack_into(req.layers, req.runs, tensor)
            self.staging.ready()
            payload: tuple = (view,)
        else:
            payload = tuple(self.memory.host_buffers(req.layers, req.runs))
        self.send(Data(req.request_id, req.chunk, nbytes), payload)

    def refuse_write(self, w: Write, code: int, why: str) -> None:
        self.channel.drain_payload()  # keep the stream in step; KV memory untouched
        self.failed_requests.add(w.request_id)
        self.send(Error(w.request_id, w.chunk, code, why))

    def serve_write(self, w: Write) -> None:
        try:
            nbytes = self.memory.check(w.layers, w.runs)
        except BlockOutOfRange as exc:
            return self.refuse_write(w, E_RANGE, str(exc))
        if nbytes != w.payload_len:
            return self.refuse_write(w, E_SIZE, f"write carries {w.payload_len} bytes for a "
                                                f"chunk of {nbytes}")
        if self.memory.staged:
            tensor, view = self.staging.get(nbytes)
            self.channel.recv_payload([view])
            self.memory.unpack_from(w.layers, w.runs, tensor)
        else:
            self.channel.recv_payload(self.memory.host_buffers(w.layers, w.runs))
        if w.last:
            refused = w.request_id in self.failed_requests
            self.failed_requests.discard(w.request_id)
            if w.notify and not refused and self.backend._notify is not None \
                    and not self.backend._notify(self.peer, w.notify):
                self.send(Error(w.request_id, w.chunk, E_BACKLOG,
                                "the receiver's unread notifications are full; the notify "
                                "was not delivered (it must call notifications())"))
                return
        self.send(Completion(w.request_id, w.chunk))


class _ClientSide(BackendPeer):
    """Our connection to one peer: a sender thread and a reader thread."""

    def __init__(self, backend: TwoSidedBackend, channel: Channel, encoder: Connection,
                 name: str) -> None:
        self.backend = backend
        self.name = name
        self.channel = channel
        self.encoder = encoder
        self.memory: RegisteredMemory = backend._memory  # type: ignore[assignment]
        self.max_inflight = backend.config.max_inflight
        self._cond = threading.Condition()
        self._queue: deque[list] = deque()  # [handle, chunks, next index]; round-robin
        self._inflight: dict[tuple[int, int], tuple[TransferHandle, Optional[Chunk]]] = {}
        self._dead: Optional[BaseException] = None
        self._send_staging = Staging(self.memory, backend.staging_device)
        self._recv_staging = Staging(self.memory, backend.staging_device)
        tag = f"{backend.agent_name}->{name}"
        self.threads = [threading.Thread(target=self._send_loop, daemon=True,
                                         name=f"kvxfer-{backend.name}-send[{tag}]"),
                        threading.Thread(target=self._read_loop, daemon=True,
                                         name=f"kvxfer-{backend.name}-read[{tag}]")]

    @property
    def alive(self) -> bool:
        return self._dead is None

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, handle: TransferHandle) -> None:
        items: list[Optional[Chunk]] = list(handle.chunks) or [None]  # None: notify-only write
        handle.abort = self.abort
        with self._cond:
            if self._dead is not None:
                dead = self._dead
            else:
                self._queue.append([handle, items, 0])
                self._cond.notify_all()
                return
        handle.fail(PeerUnreachable(f"connection to {self.name!r} is down: {dead}"))

    def abort(self) -> None:
        """Break a send or receive stuck on this connection (a dead link): see handle.py."""
        log.warning("aborting the connection to %r: a transfer is stuck in I/O", self.name)
        self.channel.shutdown()

    def die(self, exc: BaseException) -> None:
        """Fail everything pending on this connection and shut its channel."""
        with self._cond:
            if self._dead is not None:
                return
            self._dead = exc
            handles = [h for h, _ in self._inflight.values()] + [e[0] for e in self._queue]
            self._inflight.clear()
            self._queue.clear()
            self._cond.notify_all()
        self.channel.shutdown()  # first: a call stuck in I/O returns and releases its lock
        if not isinstance(exc, (KvxferError, OSError)):
            log.error("connection to %r failed unexpectedly", self.name, exc_info=exc)
        if not isinstance(exc, (AgentClosed, PeerUnreachable)):
            exc = PeerUnreachable(f"connection to {self.name!r} failed: {exc}")
        for handle in handles:
            handle.fail(exc)

    # ----------------------------------------------------------------- sending
    def _next_chunk(self) -> Optional[tuple[TransferHandle, Optional[Chunk], bool]]:
        with self._cond:
            while True:
                if self._dead is not None:
                    return None
                if self._queue and len(self._inflight) < self.max_inflight:
                    entry = self._queue.popleft()
                    handle, items, i = entry
                    if not handle.active:
                        continue
                    entry[2] = i + 1
                    last = i + 1 == len(items)
                    if not last:
                        self._queue.append(entry)
                    chunk = items[i]
                    self._inflight[(handle.request_id, chunk.index if chunk else 0)] = (handle,
                                                                                         chunk)
                    return handle, chunk, last
                self._cond.wait()

    def _send_loop(self) -> None:
        try:
            while (item := self._next_chunk()) is not None:
                handle, chunk, last = item
                try:
                    self._send_chunk(handle, chunk, last)
                except Abandoned as exc:
                    if exc.sent:  # half a frame is out: only a reset keeps the peer safe
                        raise
                    self._take(handle.request_id, chunk.index if chunk else 0)
        except BaseException as exc:  # noqa: BLE001 - any failure ends this connection
            self.die(exc)

    def _send_chunk(self, handle: TransferHandle, chunk: Optional[Chunk], last: bool) -> None:
        """Send one chunk's frame; a write's payload is read from engine memory only
        while the handle is active (so a failed or cancelled write stops reading it)."""
        rid = handle.request_id
        if handle.op == "read":
            assert chunk is not None
            self.channel.send(self.encoder.send(ReadRequest(rid, chunk.index, chunk.layers,
                                                            chunk.remote_runs)))
            return
        if chunk is None:  # a notify-only write
            self.channel.send(self.encoder.send(Write(rid, 0, (), (), 0, True, handle.notify)))
            return
        frame = Write(rid, chunk.index, chunk.layers, chunk.remote_runs, chunk.nbytes, last,
                      handle.notify if last else b"")
        if not self.memory.staged:
            payload = self.memory.host_buffers(chunk.layers, chunk.local_runs)
            self.channel.send(self.encoder.send(frame, payload), guard=handle)
            return
        tensor, view = self._send_staging.get(chunk.nbytes)
        with handle.data_lock:
            if not handle.active:
                raise Abandoned(0)
            self.memory.pack_into(chunk.layers, chunk.local_runs, tensor)
            self._send_staging.ready()
        self.channel.send(self.encoder.send(frame, [view]))  # our own copy: no guard needed

    # ----------------------------------------------------------------- reading
    def _take(self, request_id: int, chunk: int) -> tuple[TransferHandle, Optional[Chunk]]:
        with self._cond:
            entry = self._inflight.pop((request_id, chunk), None)
            self._cond.notify_all()
        if entry is None:
            raise RemoteProtocolError(f"answer for unknown request {request_id} chunk {chunk}")
        return entry

    def _read_loop(self) -> None:
        try:
            while True:
                ev = self.channel.next_event()
                if ev is CLOSED or isinstance(ev, Close):
                    raise PeerUnreachable(f"peer {self.name!r} closed the connection")
                if isinstance(ev, Data):
                    self._on_data(ev)
                elif isinstance(ev, Completion):
                    handle, chunk = self._take(ev.request_id, ev.chunk)
                    if chunk is None:
                        handle.message_done()
                    else:
                        handle.chunk_done(chunk)
                elif isinstance(ev, Error):
                    if ev.request_id == 0:
                        raise RemoteError(f"peer {self.name!r} failed the connection: "
                                          f"{ev.message}", ev.code)
                    handle, _ = self._take(ev.request_id, ev.chunk)
                    handle.fail(RemoteError(f"peer {self.name!r} refused: {ev.message}", ev.code))
                else:
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} from a server")
        except BaseException as exc:  # noqa: BLE001 - any failure ends this connection
            self.die(exc)

    def _on_data(self, d: Data) -> None:
        with self._cond:
            entry = self._inflight.get((d.request_id, d.chunk))
        if entry is None or entry[1] is None:
            raise RemoteProtocolError(f"DATA for unknown request {d.request_id} chunk {d.chunk}")
        handle, chunk = entry
        if d.payload_len != chunk.nbytes:
            raise RemoteProtocolError(f"DATA of {d.payload_len} bytes for a chunk of "
                                      f"{chunk.nbytes}")
        with handle.data_lock:  # cancel() and deadlines wait for this chunk to finish
            placed = handle.active
            if not placed:
                self.channel.drain_payload()
            elif self.memory.staged:
                tensor, view = self._recv_staging.get(chunk.nbytes)
                self.channel.recv_payload([view])
                self.memory.unpack_from(chunk.layers, chunk.local_runs, tensor)
            else:
                self.channel.recv_payload(self.memory.host_buffers(chunk.layers,
                                                                   chunk.local_runs))
        self._take(d.request_id, d.chunk)
        if placed:
            handle.chunk_done(chunk)
