"""ClientSide: our connection to one peer of a two-sided backend.

Theory of operation
-------------------
Two owned threads per connection; the reader never sends and the sender never reads, so
no two threads can wait on each other through full transport buffers::

    submit(handle) -> ChunkQueue (demand first, round-robin, <= max_inflight posted)
    sender thread:  READ(req, chunk, layers, runs)            ---->  peer's ServerSide
                    WRITE(req, chunk, ...) + payload           ---->
                    WRITE(req, n, note) (a message: notify,    ---->
                          a stream's layer / finish note)
    reader thread:  DATA + payload -> the blocks (or drained)  <----
                    COMPLETION | ERROR(req, chunk, why)        <----

- A write's messages (its notify, a stream's notes) go as frames of their own after the
  chunks they announce, so a write abandoned in the middle of a frame (cancelled, past
  its deadline) never delivers them. The sender sleeps until a part may go: the reader
  frees a slot, the engine signals a layer (``handle.kick``), or, while a write waits
  for a CUDA event, every ``EVENT_POLL`` seconds.
- A transfer that stops being active mid-frame does not cost the connection: a
  half-sent frame is finished with filler (no more engine bytes are read), a
  half-received payload is drained, and the peer's answer to it is ignored. Every
  other transfer on the connection carries on.
- A dead channel (transport error, the peer's malformed frame) fails every transfer on
  the connection at once; the connection is then closed and freed, by the reader
  thread as it ends (or by ``disconnect``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Optional

from ..codec import NONE, Agreement, CodecSession
from ..errors import AgentClosed, KvxferError, PeerUnreachable, RemoteError, RemoteProtocolError
from ..handle import TransferHandle
from ..logs import get_logger
from ..memory import RegisteredMemory
from ..plan import Chunk, Message
from ..protocol import CLOSED, Close, Completion, Connection, Data, Error, ReadRequest, Write
from ..scheduler import ChunkQueue, Part
from .base import BackendPeer
from .channel import Abandoned, Channel
from .codec_io import encode_chunk, packed_raw, place, receive_decoded
from .staging import Staging

if TYPE_CHECKING:
    from .twosided import TwoSidedBackend

log = get_logger("kvxfer.twosided")

EVENT_POLL = 0.0002  # seconds between looks at a pending write's CUDA event


class ClientSide(BackendPeer):
    """Our connection to one peer: a sender thread and a reader thread."""

    def __init__(self, backend: "TwoSidedBackend", channel: Channel, encoder: Connection,
                 name: str, agreement: Agreement = Agreement()) -> None:
        self.backend = backend
        self.name = name
        self.channel = channel
        self.encoder = encoder
        self.memory: RegisteredMemory = backend._memory  # type: ignore[assignment]
        self._cond = threading.Condition()
        self._chunks = ChunkQueue(backend.config.max_inflight)
        self._dead: Optional[BaseException] = None
        self._send_staging = Staging(self.memory, backend.staging_device, backend.staging_budget)
        self._recv_staging = Staging(self.memory, backend.staging_device, backend.staging_budget)
        self._codec_staging = Staging(self.memory, None, backend.staging_budget)  # host
        self.codec = CodecSession(agreement, self.memory.layout.dtype.itemsize)
        tag = f"{backend.agent_name}->{name}"
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"kvxfer-{backend.name}-send[{tag}]")
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"kvxfer-{backend.name}-read[{tag}]")
        self.threads = [self._sender, self._reader]

    @property
    def alive(self) -> bool:
        return self._dead is None

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, handle: TransferHandle) -> None:
        handle.abort = self.abort
        handle.kick = self._kick
        with self._cond:
            if self._dead is None:
                self._chunks.push(handle, [*handle.chunks, *handle.messages])
                self._cond.notify_all()
                return
            dead = self._dead
        handle.fail(PeerUnreachable(f"connection to {self.name!r} is down: {dead}"))

    def _kick(self) -> None:
        with self._cond:
            self._cond.notify_all()

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
            handles = self._chunks.clear()
            self._cond.notify_all()
        self.channel.shutdown()  # first: a call stuck in I/O returns and releases its lock
        if not isinstance(exc, (KvxferError, OSError)):
            log.error("connection to %r failed unexpectedly", self.name, exc_info=exc)
        if not isinstance(exc, (AgentClosed, PeerUnreachable)):
            exc = PeerUnreachable(f"connection to {self.name!r} failed: {exc}")
        for handle in handles:
            handle.fail(exc)

    def join(self, timeout: float = 10) -> None:
        """Wait for both threads to end (after ``die``), then free the connection."""
        for t in self.threads:
            if t is not threading.current_thread() and t.ident is not None:
                t.join(timeout)
        self._free()

    def _free(self) -> None:
        self.channel.close()
        self._send_staging.release()
        self._recv_staging.release()
        self._codec_staging.release()
        self.backend._forget_client(self)

    # ----------------------------------------------------------------- sending
    def _next(self) -> Optional[tuple[TransferHandle, Part]]:
        with self._cond:
            while True:
                if self._dead is not None:
                    return None
                item = self._chunks.next()
                if item is not None:
                    return item
                # Nothing may go: wait for a slot or a kick; look again soon if some
                # part waits for a CUDA event.
                self._cond.wait(EVENT_POLL if self._chunks.waiting else None)

    def _finish(self, request_id: int, chunk: int) -> tuple[TransferHandle, Part]:
        with self._cond:
            entry = self._chunks.finish(request_id, chunk)
            self._cond.notify_all()
        if entry is None:
            raise RemoteProtocolError(f"answer for unknown request {request_id} chunk {chunk}")
        return entry

    def _send_loop(self) -> None:
        try:
            while True:
                waited = time.perf_counter()
                if (item := self._next()) is None:
                    break
                self.codec.took_work(time.perf_counter() - waited)
                handle, chunk = item
                try:
                    self._send_item(handle, chunk)
                except Abandoned as exc:
                    if not exc.sent:  # never went out: no answer will come
                        self._finish(handle.request_id, chunk.index)
        except BaseException as exc:  # noqa: BLE001 - any failure ends this connection
            self.die(exc)

    def _send_item(self, handle: TransferHandle, item: Part) -> None:
        """Send one part's frame; a write's payload is read from engine memory only
        while the handle is active (so a failed or cancelled write stops reading it)."""
        rid = handle.request_id
        mine, theirs = (handle.heads.local, handle.heads.remote) if handle.heads else (None, None)
        if isinstance(item, Message):  # the request's last frame once it is the final note
            if not handle.active:
                raise Abandoned(0)
            self.channel.send(self.encoder.send(Write(rid, item.index, (), (), 0,
                                                      item.layer is None, handle.note(item))))
            return
        if handle.op == "read":
            self.channel.send(self.encoder.send(ReadRequest(rid, item.index, item.layers,
                                                            item.remote_runs, theirs)))
            return
        if self.codec.next_encoded():  # packed on the host under the lock, encoded
            with packed_raw(self.memory, self._codec_staging, item.layers, item.local_runs,
                            mine, item.nbytes, guard=handle) as raw:
                payload, enc, tried, size = encode_chunk(self.codec, raw)
                self.channel.send(self.encoder.send(
                    Write(rid, item.index, item.layers, item.remote_runs, size, False, b"",
                          theirs, enc), [payload]))
            self.codec.sent(tried, item.nbytes, size)
            return
        frame = Write(rid, item.index, item.layers, item.remote_runs, item.nbytes, False, b"",
                      theirs)
        if not self.memory.stages(item.local_runs, mine):
            payload = self.memory.host_buffers(item.layers, item.local_runs, mine)
            self.channel.send(self.encoder.send(frame, payload), guard=handle)
        else:
            with self._send_staging.use(item.nbytes) as (tensor, view):
                with handle.data_lock:
                    if not handle.active:
                        raise Abandoned(0)
                    self.memory.pack_into(item.layers, item.local_runs, tensor, mine)
                self.channel.send(self.encoder.send(frame, [view]))  # our copy: no guard
        self.codec.sent(NONE, item.nbytes, item.nbytes)  # auto measures it too

    # ----------------------------------------------------------------- reading
    def _read_loop(self) -> None:
        try:
            while True:
                ev = self.channel.next_event()
                if ev is CLOSED or isinstance(ev, Close):
                    raise PeerUnreachable(f"peer {self.name!r} closed the connection")
                if isinstance(ev, Data):
                    self._on_data(ev)
                elif isinstance(ev, Completion):
                    handle, item = self._finish(ev.request_id, ev.chunk)
                    if isinstance(item, Message):
                        handle.message_done()
                    else:
                        handle.chunk_done(item)
                elif isinstance(ev, Error):
                    if ev.request_id == 0:
                        raise RemoteError(f"peer {self.name!r} failed the connection: "
                                          f"{ev.message}", ev.code)
                    handle, _ = self._finish(ev.request_id, ev.chunk)
                    handle.fail(RemoteError(f"peer {self.name!r} refused: {ev.message}", ev.code))
                else:
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} from a server")
        except BaseException as exc:  # noqa: BLE001 - any failure ends this connection
            self.die(exc)
        finally:
            if self._sender.ident is not None:
                self._sender.join(10)
            self._free()

    def _on_data(self, d: Data) -> None:
        with self._cond:
            entry = self._chunks.posted(d.request_id, d.chunk)
        if entry is None or not isinstance(entry[1], Chunk):
            raise RemoteProtocolError(f"DATA for unknown request {d.request_id} chunk {d.chunk}")
        handle, chunk = entry
        mine = handle.heads.local if handle.heads else None
        if d.enc is not None and d.enc.raw_len != chunk.nbytes:  # the stream is in step:
            self.channel.drain_payload()  # only this transfer fails
            self._finish(d.request_id, d.chunk)
            handle.fail(RemoteProtocolError(f"DATA announced as {d.enc.raw_len} raw bytes "
                                            f"for a chunk of {chunk.nbytes}; nothing placed"))
            return
        if d.payload_len != chunk.nbytes and d.enc is None:
            raise RemoteProtocolError(f"DATA of {d.payload_len} bytes for a chunk of "
                                      f"{chunk.nbytes}")
        if d.enc is not None:  # decoded and verified before a byte is placed
            try:
                raw = receive_decoded(self.channel, d.payload_len, d.enc)
            except RemoteProtocolError as exc:  # this transfer's failure, not the link's
                self._finish(d.request_id, d.chunk)
                handle.fail(exc)
                return
            placed = place(self.memory, chunk.layers, chunk.local_runs, raw, mine, handle,
                           self._recv_staging)
        elif not handle.active:
            self.channel.drain_payload()
            placed = False
        elif self.memory.stages(chunk.local_runs, mine):  # the payload lands in our buffer
            with self._recv_staging.use(chunk.nbytes, wait=False) as (tensor, view):
                self.channel.recv_payload([view])
                with handle.data_lock:  # cancel() and deadlines wait for the unpack
                    placed = handle.active
                    if placed:
                        self.memory.unpack_from(chunk.layers, chunk.local_runs, tensor, mine)
        else:  # straight into the blocks, each transport call under the handle's lock
            placed = self.channel.recv_payload(
                self.memory.host_buffers(chunk.layers, chunk.local_runs, mine), guard=handle)
        self._finish(d.request_id, d.chunk)
        if placed:
            handle.chunk_done(chunk)
