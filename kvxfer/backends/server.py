"""ServerSide: answers one peer's READ and WRITE requests on one accepted channel.

Theory of operation
-------------------
One thread per accepted channel. After the handshake (layouts and, with a secret,
proofs checked: :mod:`kvxfer.protocol.handshake`; socket transports finish it before the
thread starts, :mod:`kvxfer.backends.gate`) it takes frames in order and answers every
request, each on its own::

    READ(req, chunk, heads, layers, runs) -> check -> DATA + the blocks' bytes | ERROR
                                     (a head range: only those heads' pieces, packed)
    WRITE(req, chunk, ..., payload)  -> check -> payload into the blocks -> COMPLETION
                                                 | drain the payload -> ERROR
    WRITE(req, n, note, no runs)     -> deliver the note to the agent (unless a chunk
                                        of the request was refused) -> COMPLETION | ERROR

- ``memory.check`` bounds every request before any work or allocation: layers and
  blocks in range, no block twice, at most one frame's payload. Staging is sized by
  that chunk, never by a request.
- A request's failure is its own: a refused request gets an ERROR naming why, and an
  unexpected error while serving it gets ``E_INTERNAL`` with the cause; the stream is
  kept in step (a refused write's payload is drained) and the connection serves on.
  Only a broken transport or a peer's malformed frame ends the connection.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..codec import NONE, Agreement, CodecSession
from ..errors import BlockOutOfRange, KvxferError, RemoteProtocolError
from ..logs import get_logger
from ..memory import RegisteredMemory
from ..protocol import (CLOSED, E_BACKLOG, E_CODEC, E_INTERNAL, E_PROTOCOL, E_RANGE, E_SIZE,
                        Close, Completion, Connection, Data, Error, ReadRequest, Write)
from ..protocol.handshake import ServerHandshake
from .channel import Channel
from .codec_io import encode_chunk, packed_raw, place, receive_decoded
from .staging import Staging

if TYPE_CHECKING:
    from .twosided import TwoSidedBackend

log = get_logger("kvxfer.twosided")

LINGER = 1.0  # seconds a refused peer is given to read the refusal and close
MAX_REFUSED = 4096  # writes remembered as refused until their last frame comes


class ServerSide:
    """Serves one peer's requests on one accepted channel (its own thread)."""

    def __init__(self, backend: "TwoSidedBackend", channel: Channel,
                 shake: Optional[ServerHandshake] = None) -> None:
        self.backend = backend
        self.channel = channel
        self.shake = shake  # finished by a HandshakeGate, or None: run it on our thread
        self.established = shake is not None and shake.done  # read under backend._lock
        self.memory: RegisteredMemory = backend._memory  # type: ignore[assignment]
        self.encoder = Connection(expect_hello=False)
        self.staging = Staging(self.memory, backend.staging_device, backend.staging_budget)
        self.host_staging = Staging(self.memory, None, backend.staging_budget)  # codec
        self.codec = CodecSession(Agreement(), 1)  # set once the handshake is done
        self.peer = shake.peer if shake is not None else "?"
        # Writes with a refused chunk: their notify is not delivered. Bounded (oldest
        # forgotten), since a writer that gave up never sends the last frame.
        self.refused: OrderedDict[int, None] = OrderedDict()
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name=f"kvxfer-{backend.name}-serve[{backend.agent_name}]")

    def send(self, frame: object, payload: tuple = ()) -> None:
        self.channel.send(self.encoder.send(frame, payload))  # type: ignore[arg-type]

    def handshake(self) -> bool:
        """Run the handshake on this thread, within the hello timeout; True: serve."""
        shake = self.shake = self.backend.server_handshake()
        deadline = time.monotonic() + self.backend.config.hello_timeout
        while not shake.finished:
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("a connection did not finish its handshake in time: closed")
                return False
            self.channel.set_timeout(left)
            replies = shake.on_event(self.channel.next_event())
            self.peer = shake.peer
            for frame in replies:
                self.send(frame)
        if shake.refused is not None:
            (log.warning if shake.code is not None else log.debug)(
                "refused a connection from %r: %s", self.peer, shake.refused)
            self.linger()
            return False
        with self.backend._lock:
            self.established = True
        return True

    def linger(self) -> None:
        """After a refusal, let the peer read it and close first (at most LINGER s):
        closing at once can drop the refusal in flight (UCX cancels it)."""
        deadline = time.monotonic() + LINGER
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.channel.set_timeout(left)
                if self.channel.next_event() is CLOSED:
                    return
        except Exception:  # noqa: BLE001 - the peer closed, or it took too long: either ends it
            pass

    def run(self) -> None:
        try:
            if not self.established and not self.handshake():
                return
            assert self.shake is not None and self.shake.theirs is not None
            self.codec = CodecSession(self.backend.agree(self.peer, self.shake.theirs,
                                                         initiator=False),
                                      self.memory.layout.dtype.itemsize)
            self.channel.set_timeout(self.backend.config.connect_timeout)
            self.channel.established()
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
        except Exception:  # noqa: BLE001 - a bug of ours: say so, and free the channel
            log.exception("serving peer %r failed; closing its connection", self.peer)
        finally:
            self.channel.shutdown()
            self.channel.close()
            self.staging.release()
            self.host_staging.release()
            self.backend._forget(self)

    def serve(self) -> None:
        while True:
            waited = time.perf_counter()
            ev = self.channel.next_event()
            self.codec.took_work(time.perf_counter() - waited)
            if ev is CLOSED or isinstance(ev, Close):
                return
            if isinstance(ev, ReadRequest):
                self.answer(ev, self.serve_read)
            elif isinstance(ev, Write):
                self.answer(ev, self.serve_write)
            else:
                raise RemoteProtocolError(f"unexpected {type(ev).__name__} from a client")

    def answer(self, req: ReadRequest | Write, serve: Callable[[Any], None]) -> None:
        """Serve one request; an unexpected error answers it with E_INTERNAL and the
        connection goes on (the transport's own failures still end it)."""
        try:
            serve(req)
        except (OSError, RemoteProtocolError):
            raise
        except Exception as exc:  # noqa: BLE001 - answered, logged, and the peer serves on
            log.exception("serving %s #%d chunk %d from %r failed", type(req).__name__,
                          req.request_id, req.chunk, self.peer)
            if isinstance(req, Write):
                self.channel.drain_payload()  # whatever is left of it: keep in step
                self.remember_refused(req.request_id)
            self.send(Error(req.request_id, req.chunk, E_INTERNAL,
                            f"internal error: {type(exc).__name__}: {exc}"))

    def serve_read(self, req: ReadRequest) -> None:
        try:
            nbytes = self.memory.check(req.layers, req.runs, req.heads)
        except BlockOutOfRange as exc:
            self.send(Error(req.request_id, req.chunk, E_RANGE, str(exc)))
            return
        if self.codec.next_encoded():  # packed on the host, encoded, sent from our copy
            with packed_raw(self.memory, self.host_staging, req.layers, req.runs, req.heads,
                            nbytes) as raw:
                payload, enc, tried, size = encode_chunk(self.codec, raw)
                self.send(Data(req.request_id, req.chunk, size, enc), (payload,))
            self.codec.sent(tried, nbytes, size)
            return
        if self.memory.stages(req.runs, req.heads):  # a head slice: only those heads
            with self.staging.use(nbytes) as (tensor, view):
                self.memory.pack_into(req.layers, req.runs, tensor, req.heads)
                self.send(Data(req.request_id, req.chunk, nbytes), (view,))
        else:
            self.send(Data(req.request_id, req.chunk, nbytes),
                      tuple(self.memory.host_buffers(req.layers, req.runs, req.heads)))
        self.codec.sent(NONE, nbytes, nbytes)  # auto measures this setting too

    def remember_refused(self, request_id: int) -> None:
        self.refused[request_id] = None
        self.refused.move_to_end(request_id)
        while len(self.refused) > MAX_REFUSED:
            self.refused.popitem(last=False)

    def refuse_write(self, w: Write, code: int, why: str) -> None:
        self.channel.drain_payload()  # keep the stream in step; KV memory untouched
        self.remember_refused(w.request_id)
        self.send(Error(w.request_id, w.chunk, code, why))

    def serve_write(self, w: Write) -> None:
        try:
            nbytes = self.memory.check(w.layers, w.runs, w.heads)
        except BlockOutOfRange as exc:
            return self.refuse_write(w, E_RANGE, str(exc))
        raw_len = w.payload_len if w.enc is None else w.enc.raw_len
        if nbytes != raw_len:
            return self.refuse_write(w, E_SIZE, f"write carries {raw_len} bytes for a "
                                                f"chunk of {nbytes}")
        if w.runs and w.enc is not None:  # decoded and verified before a byte is placed
            try:
                raw = receive_decoded(self.channel, w.payload_len, w.enc)
            except RemoteProtocolError as exc:
                log.warning("refusing chunk %d of write #%d from %r: %s", w.chunk,
                            w.request_id, self.peer, exc)
                self.remember_refused(w.request_id)
                self.send(Error(w.request_id, w.chunk, E_CODEC, str(exc)))
                return
            place(self.memory, w.layers, w.runs, raw, w.heads, None, self.staging)
        elif w.runs and self.memory.stages(w.runs, w.heads):
            with self.staging.use(nbytes, wait=False) as (tensor, view):
                self.channel.recv_payload([view])
                self.memory.unpack_from(w.layers, w.runs, tensor, w.heads)
        elif w.runs:
            self.channel.recv_payload(self.memory.host_buffers(w.layers, w.runs, w.heads))
        refused = w.request_id in self.refused
        if w.last:  # the request's last frame: no more of it will come
            self.refused.pop(w.request_id, None)
        if w.notify and not refused and self.backend._notify is not None \
                and not self.backend._notify(self.peer, w.notify):
            self.send(Error(w.request_id, w.chunk, E_BACKLOG,
                            "the receiver's unread notifications (or incoming streams) "
                            "are full; the note was not delivered (it must call "
                            "notifications() or incoming())"))
            return
        self.send(Completion(w.request_id, w.chunk))
