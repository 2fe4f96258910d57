"""TCP backend: one-sided reads and writes over a two-sided byte stream.

Theory of operation
-------------------
Each ``connect`` opens one TCP connection to the peer, used for every request from us
to it; the peer serves it. Requests travel one way, answers the other::

    initiator (client)                                   target (server)
    sender thread --READ(req, chunk, layers, runs)-----> serve thread: check ids,
                  --WRITE(...) + payload ------------->   sendmsg DATA + block views
    reader thread <--DATA + payload / COMPLETION-------   or recvmsg_into block views,
                  <--ERROR(req, chunk, why)------------   then COMPLETION

- Host memory moves with scatter-gather I/O straight between sockets and KV blocks;
  CUDA memory (or ``staged=True``) goes through one packed staging buffer per thread.
- At most ``max_inflight`` chunks are outstanding per connection, so memory is bounded
  whatever the request size; the sender takes chunks round-robin across requests, so a
  small request waits for at most ``max_inflight`` chunks, not for a whole large one.
- The reader never sends and the sender never reads, so no two threads can wait on
  each other through full socket buffers.
- A dead socket fails every request on that connection at once; nothing waits longer
  than its deadline (the Agent enforces deadlines).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from typing import Optional

import torch

from ..errors import (AgentClosed, BlockOutOfRange, KvxferError, LayoutMismatch, PeerUnreachable,
                      ProtocolError, RemoteError, RemoteProtocolError)
from ..handle import TransferHandle
from ..memory import RegisteredMemory
from ..plan import Chunk
from ..protocol import (CLOSED, E_LAYOUT, E_PROTOCOL, E_RANGE, E_SIZE, Close, Completion,
                        Connection, Data, Error, Hello, ReadRequest, Write)
from .base import Backend, BackendConfig, BackendPeer, NotifySink, PeerInfo, parse_host_port
from .sockio import FrameReader, send_buffers

log = logging.getLogger("kvxfer.tcp")
SOCK_BUF = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Staging:
    """A reusable contiguous buffer for packed chunks, grown on demand."""

    def __init__(self, memory: RegisteredMemory) -> None:
        self.memory = memory
        self.tensor: Optional[torch.Tensor] = None

    def get(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.tensor = self.memory.staging_buffer(nbytes)
        return self.tensor, memoryview(self.tensor.numpy()).cast("B")[:nbytes]


class TcpBackend(Backend):
    name = "tcp"
    one_sided = False

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        super().__init__(agent_name, listen, config)
        host, port = parse_host_port(listen)
        try:
            self._lsock = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            raise PeerUnreachable(f"cannot listen on {listen!r}: {exc}") from exc
        self._lock = threading.Lock()
        self._closed = False
        self._memory: Optional[RegisteredMemory] = None
        self._notify: Optional[NotifySink] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._servers: set[_ServerSide] = set()
        self._clients: list[_ClientSide] = []

    def address(self) -> str:
        host, port = self._lsock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostbyname(socket.gethostname())
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None:
        self._memory, self._notify = memory, notify
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"kvxfer-tcp-accept[{self.agent_name}]")
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._lsock.accept()
            except OSError:
                return  # listening socket shut down by close()
            _tune(sock)
            server = _ServerSide(self, sock)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._servers.add(server)
            server.thread.start()

    def connect(self, peer: PeerInfo) -> "_ClientSide":
        assert self._memory is not None, "start() first"
        host, port = parse_host_port(peer.address)
        try:
            sock = socket.create_connection((host, port), timeout=self.config.connect_timeout)
        except OSError as exc:
            raise PeerUnreachable(f"cannot reach peer {peer.name!r} at {peer.address}: {exc}") \
                from exc
        try:
            _tune(sock)
            reader = FrameReader(sock, Connection())
            encoder = Connection(expect_hello=False)
            send_buffers(sock, encoder.send(Hello(self.agent_name, self._memory.descriptor_bytes)))
            reply = reader.next_event()
            if isinstance(reply, Error):
                if reply.code == E_LAYOUT:
                    raise LayoutMismatch(f"peer {peer.name!r} refused our layout: "
                                         f"{reply.message}")
                raise RemoteError(f"peer {peer.name!r} refused the connection: {reply.message}",
                                  reply.code)
            if not isinstance(reply, Hello):
                raise PeerUnreachable(f"peer {peer.name!r} closed the connection during hello")
            self._memory.check_peer(reply.descriptor)
            sock.settimeout(None)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise PeerUnreachable(f"hello with peer {peer.name!r} failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        client = _ClientSide(self, sock, reader, encoder, peer.name)
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
        _shutdown(self._lsock)
        self._lsock.close()
        for client in clients:
            client.die(AgentClosed("agent closed"))
        for server in servers:
            _shutdown(server.sock)
        threads = [t for c in clients for t in c.threads] + [s.thread for s in servers]
        if self._accept_thread is not None:
            threads.append(self._accept_thread)
        for t in threads:
            if t is not threading.current_thread() and t.ident is not None:
                t.join(timeout=10)


class _ServerSide:
    """Serves one peer's requests on one accepted connection (its own thread)."""

    def __init__(self, backend: TcpBackend, sock: socket.socket) -> None:
        self.backend = backend
        self.sock = sock
        self.memory: RegisteredMemory = backend._memory  # type: ignore[assignment]
        self.reader = FrameReader(sock, Connection())
        self.encoder = Connection(expect_hello=False)
        self.staging = _Staging(self.memory)
        self.peer = "?"
        self.failed_requests: set[int] = set()  # writes with a refused chunk: no notify
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name=f"kvxfer-tcp-serve[{backend.agent_name}]")

    def send(self, frame: object, payload: tuple = ()) -> None:
        send_buffers(self.sock, self.encoder.send(frame, payload))  # type: ignore[arg-type]

    def run(self) -> None:
        try:
            self.sock.settimeout(self.backend.config.connect_timeout)
            hello = self.reader.next_event()
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
            self.sock.settimeout(None)
            self.serve()
        except RemoteProtocolError as exc:
            log.warning("protocol error from peer %r, closing its connection: %s", self.peer, exc)
            try:
                self.send(Error(0, 0, E_PROTOCOL, str(exc)))
            except (OSError, ProtocolError):
                pass
        except (OSError, KvxferError) as exc:
            log.debug("connection from %r ended: %s", self.peer, exc)
        finally:
            _shutdown(self.sock)
            self.sock.close()
            self.backend._forget(self)

    def serve(self) -> None:
        while True:
            ev = self.reader.next_event()
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
            payload: tuple = (view,)
        else:
            payload = tuple(self.memory.host_buffers(req.layers, req.runs))
        self.send(Data(req.request_id, req.chunk, nbytes), payload)

    def refuse_write(self, w: Write, code: int, why: str) -> None:
        self.reader.drain_payload()  # keep the stream in step; KV memory untouched
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
            self.reader.recv_payload([view])
            self.memory.unpack_from(w.layers, w.runs, tensor)
        else:
            self.reader.recv_payload(self.memory.host_buffers(w.layers, w.runs))
        if w.last:
            refused = w.request_id in self.failed_requests
            self.failed_requests.discard(w.request_id)
            if w.notify and not refused and self.backend._notify is not None:
                self.backend._notify(self.peer, w.notify)
        self.send(Completion(w.request_id, w.chunk))


class _ClientSide(BackendPeer):
    """Our connection to one peer: a sender thread and a reader thread."""

    def __init__(self, backend: TcpBackend, sock: socket.socket, reader: FrameReader,
                 encoder: Connection, name: str) -> None:
        self.backend = backend
        self.name = name
        self.sock = sock
        self.reader = reader
        self.encoder = encoder
        self.memory: RegisteredMemory = backend._memory  # type: ignore[assignment]
        self.max_inflight = backend.config.max_inflight
        self._cond = threading.Condition()
        self._queue: deque[list] = deque()  # [handle, chunks, next index]; round-robin
        self._inflight: dict[tuple[int, int], tuple[TransferHandle, Optional[Chunk]]] = {}
        self._dead: Optional[BaseException] = None
        self._send_staging = _Staging(self.memory)
        self._recv_staging = _Staging(self.memory)
        tag = f"{backend.agent_name}->{name}"
        self.threads = [threading.Thread(target=self._send_loop, daemon=True,
                                         name=f"kvxfer-tcp-send[{tag}]"),
                        threading.Thread(target=self._read_loop, daemon=True,
                                         name=f"kvxfer-tcp-read[{tag}]")]

    @property
    def alive(self) -> bool:
        return self._dead is None

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, handle: TransferHandle) -> None:
        items: list[Optional[Chunk]] = list(handle.chunks) or [None]  # None: notify-only write
        with self._cond:
            if self._dead is not None:
                dead = self._dead
            else:
                self._queue.append([handle, items, 0])
                self._cond.notify_all()
                return
        handle.fail(PeerUnreachable(f"connection to {self.name!r} is down: {dead}"))

    def die(self, exc: BaseException) -> None:
        """Fail everything pending on this connection and shut its socket."""
        with self._cond:
            if self._dead is not None:
                return
            self._dead = exc
            handles = [h for h, _ in self._inflight.values()] + [e[0] for e in self._queue]
            self._inflight.clear()
            self._queue.clear()
            self._cond.notify_all()
        if not isinstance(exc, (KvxferError, OSError)):
            log.error("connection to %r failed unexpectedly", self.name, exc_info=exc)
        if not isinstance(exc, (AgentClosed, PeerUnreachable)):
            exc = PeerUnreachable(f"connection to {self.name!r} failed: {exc}")
        for handle in handles:
            handle.fail(exc)
        _shutdown(self.sock)

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
                if handle.op == "read":
                    assert chunk is not None
                    frames = self.encoder.send(ReadRequest(handle.request_id, chunk.index,
                                                           chunk.layers, chunk.remote_runs))
                elif chunk is None:
                    frames = self.encoder.send(Write(handle.request_id, 0, (), (), 0, True,
                                                     handle.notify))
                else:
                    frames = self.encoder.send(
                        Write(handle.request_id, chunk.index, chunk.layers, chunk.remote_runs,
                              chunk.nbytes, last, handle.notify if last else b""),
                        self._write_payload(chunk))
                send_buffers(self.sock, frames)
        except BaseException as exc:  # noqa: BLE001 - any failure ends this connection
            self.die(exc)

    def _write_payload(self, chunk: Chunk) -> list:
        if self.memory.staged:
            tensor, view = self._send_staging.get(chunk.nbytes)
            self.memory.pack_into(chunk.layers, chunk.local_runs, tensor)
            return [view]
        return self.memory.host_buffers(chunk.layers, chunk.local_runs)

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
                ev = self.reader.next_event()
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
                self.reader.drain_payload()
            elif self.memory.staged:
                tensor, view = self._recv_staging.get(chunk.nbytes)
                self.reader.recv_payload([view])
                self.memory.unpack_from(chunk.layers, chunk.local_runs, tensor)
            else:
                self.reader.recv_payload(self.memory.host_buffers(chunk.layers, chunk.local_runs))
        self._take(d.request_id, d.chunk)
        if placed:
            handle.chunk_done(chunk)
