"""Layer-wise streams: push each layer's KV as the engine computes it, and see it land.

Theory of operation
-------------------
A prefill computes layer after layer; disaggregated serving hides the KV transfer only
if layer i travels while layer i+1 is computed. A :class:`WriteStream` is one write
whose chunks each hold a single layer (:func:`kvxfer.plan.plan_layer_chunks`) and are
held back until the engine signals their layer::

    engine thread                backend sender (ChunkQueue)           receiving agent
    layer_ready(0, ev0) -kick->  L0 chunks once ev0 completed  ---->   blocks written
                                 NOTE_LAYERS(key, [0])         ---->   incoming(key).layer 0
    layer_ready(2, ev2) -kick->  L2 chunks, NOTE_LAYERS [2]    ---->   (any order)
    layer_ready(1, ev1)          L1 chunks, NOTE_LAYERS [1]    ---->
    finish(notify)               NOTE_FINISHED(key, notify)    ---->   incoming(key) done

- ``layer_ready`` never blocks: it records the layer (and its CUDA event) and wakes the
  backend, whose queue passes over layers not yet signalled and polls pending events
  without blocking (see :mod:`kvxfer.scheduler`). Each layer is signalled at most once.
- A layer's note goes after that layer's chunks: on a two-sided connection right after
  they are sent (the peer takes frames in order), over NIXL once they completed.
- The receiver keeps an :class:`IncomingTransfer` per (peer, key) in an
  :class:`IncomingTable`, made by whichever comes first, the engine's ``incoming(key)``
  or the first note. The table is bounded like notifications: past ``max_entries``
  transfers the engine has not asked about, a note is refused (the writer's stream
  fails with E_BACKLOG, nothing is dropped silently). Finished transfers the engine has
  asked about are kept, most recent ``KEEP_FINISHED``, so asking again still answers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

from .backends.base import BackendConfig
from .errors import TransferFailed, TransferTimeout
from .handle import DEMAND, LATER, POLL, READY, TransferHandle
from .logs import get_logger
from .plan import Chunk, Message, Run, chunk_size, plan_chunks, plan_layer_chunks
from .protocol.frames import NOTE_FINISHED, NOTE_LAYERS, NOTE_USER, Note, decode_note, encode_note

log = get_logger("kvxfer.streams")

KEEP_FINISHED = 1024  # finished incoming transfers kept after the engine asked for them


class StreamHandle(TransferHandle):
    """The handle of a :class:`WriteStream`: chunks go once their layer is signalled."""

    def __init__(self, *args: Any, key: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self._events: dict[int, Any] = {}  # signalled layer -> its pending event
        self._released: set[int] = set()  # signalled layers whose event completed
        self._finish_note: Optional[bytes] = None  # set by finish()
        self._signal_lock = threading.Lock()

    def signal(self, layer: int, event: Any) -> None:
        with self._signal_lock:
            if layer not in self._layer_left:
                raise ValueError(f"layer {layer} is not part of this stream ({self.layers})")
            if layer in self._events or layer in self._released:
                raise ValueError(f"layer {layer} of stream {self.key!r} was signalled twice")
            if event is None:
                self._released.add(layer)
            else:
                self._events[layer] = event
        self._kick()

    def finish_with(self, notify: bytes) -> None:
        with self._signal_lock:
            if self._finish_note is not None:
                raise ValueError(f"stream {self.key!r} was finished twice")
            self._finish_note = encode_note(Note(NOTE_FINISHED, self.key, message=notify))
        self._kick()

    def readiness(self, part: Chunk | Message) -> int:
        if isinstance(part, Message):
            if part.layer is not None:
                return READY
            return READY if self._finish_note is not None else LATER
        layer = part.layers[0]
        if layer in self._released:
            return READY
        event = self._events.get(layer)
        if event is None:
            return LATER
        if not event.query():
            return POLL
        with self._signal_lock:
            self._events.pop(layer, None)
            self._released.add(layer)
        return READY

    def note(self, message: Message) -> bytes:
        if message.layer is None:
            assert self._finish_note is not None, "sent only once finished"
            return self._finish_note
        return message.note


def stream_messages(key: bytes, layers: Sequence[int], first_index: int) -> list[Message]:
    """One "layer landed" note per layer, then the "finished" note."""
    messages = [Message(first_index + i, layer, encode_note(Note(NOTE_LAYERS, key, (layer,))))
                for i, layer in enumerate(layers)]
    messages.append(Message(first_index + len(layers), None))
    return messages


def make_handle(request_id: int, peer: str, op: str, runs: Sequence[Run], layers: list[int],
                block_bytes: int, config: BackendConfig, deadline: float, *,
                notify: bytes = b"", event: Any = None, priority: str = DEMAND,
                key: Optional[bytes] = None) -> TransferHandle:
    """Plan a transfer's chunks and messages and make its handle: a write stream's
    (``key`` given: one layer per chunk, a note per layer and one at the end) or an
    ordinary read's or write's (its notify as a note after every chunk). ``block_bytes``:
    the bytes of one block in one layer that move (the heads both peers hold)."""
    total = sum(n for _, _, n in runs) * block_bytes * len(layers)
    size = chunk_size(total, config.chunk_bytes, config.max_inflight)
    if key is not None:
        chunks = plan_layer_chunks(runs, layers, block_bytes, size)
        return StreamHandle(request_id, peer, op, layers, chunks, b"", deadline,
                            messages=stream_messages(key, layers, len(chunks)),
                            priority=priority, key=key)
    chunks = plan_chunks(runs, layers, block_bytes, size)
    messages = [Message(len(chunks), None, encode_note(Note(NOTE_USER, message=notify)))
                ] if notify else []
    return TransferHandle(request_id, peer, op, layers, chunks, notify, deadline,
                          source_event=event, messages=messages, priority=priority)


class WriteStream:
    """A layer-wise write (from :meth:`kvxfer.Agent.write_stream`).

    Attributes:
        handle: an ordinary TransferHandle: ``wait``, ``wait_layer``, ``cancel``,
            deadline. Done once the peer has every layer and the finish note.
        key: the request key the receiver asks :meth:`kvxfer.Agent.incoming` for.
    """

    def __init__(self, handle: StreamHandle, max_notify: int) -> None:
        self.handle = handle
        self.key = handle.key
        self._max_notify = max_notify

    def layer_ready(self, layer: int, event: Any = None) -> None:
        """Layer ``layer``'s KV is computed: send it once ``event`` has completed.

        Never blocks. Layers may come in any order, each once.

        Args:
            layer: a layer of this stream.
            event: a ``torch.cuda.Event`` recorded after the layer's KV was written (or
                anything with a non-blocking ``query()``); None for host memory.

        Raises:
            ValueError: the layer is not part of the stream, or was signalled already.
            TypeError: ``event`` has no ``query()``.
        """
        if event is not None and not callable(getattr(event, "query", None)):
            raise TypeError(f"event must be a torch.cuda.Event (or have query()), got "
                            f"{type(event).__name__}")
        self.handle.signal(layer, event)

    def finish(self, notify: bytes = b"") -> None:
        """No layer is missing any more: once all have gone, tell the receiver, with
        ``notify`` for its :meth:`~kvxfer.Agent.notifications` (if not empty).

        Raises:
            ValueError: finished twice, or ``notify`` over 64 KiB.
        """
        notify = bytes(notify)
        if len(notify) > self._max_notify:
            raise ValueError(f"notify of {len(notify)} bytes exceeds {self._max_notify}")
        self.handle.finish_with(notify)

    def __repr__(self) -> str:
        return f"WriteStream({self.key!r}, {self.handle!r})"


class IncomingTransfer:
    """What has landed of one stream a peer writes to us (from :meth:`Agent.incoming`)."""

    def __init__(self, peer: str, key: bytes) -> None:
        self.peer = peer
        self.key = key
        self._cond = threading.Condition()
        self._landed: set[int] = set()
        self._finished = False
        # Set once by the receiving backend: what landed does not match what the writer
        # sent (nixl checksums); every wait raises it from then on.
        self._error: Optional[TransferFailed] = None
        self.asked = False  # the engine has asked for it (never set back)

    @property
    def layers_landed(self) -> frozenset[int]:
        with self._cond:
            return frozenset(self._landed)

    def done(self) -> bool:
        """Every layer has landed and the writer finished the stream."""
        return self._finished

    def landed(self, layers: Sequence[int]) -> None:
        with self._cond:
            self._landed.update(layers)
            self._cond.notify_all()

    def finished(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """What landed is wrong (the first failure is kept): every wait raises it."""
        with self._cond:
            if self._error is None:
                self._error = TransferFailed(f"stream {self.key!r} from {self.peer!r}: {exc}",
                                             peer=self.peer, cause=exc)
            self._cond.notify_all()

    @property
    def error(self) -> Optional[TransferFailed]:
        return self._error

    def _wait_for(self, ready: Any, timeout: Optional[float], what: str) -> None:
        limit = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not ready() and self._error is None:
                left = None if limit is None else limit - time.monotonic()
                if left is not None and left <= 0:
                    raise TransferTimeout(f"{what} of stream {self.key!r} from {self.peer!r} "
                                          f"not landed within {timeout} s", peer=self.peer)
                self._cond.wait(left)
            if self._error is not None:
                raise self._error

    def wait_layer(self, layer: int, timeout: Optional[float] = None) -> None:
        """Block until ``layer`` has landed in our blocks.

        Raises:
            TransferTimeout: not within ``timeout`` seconds.
            TransferFailed: the stream finished without that layer, or a chunk of it
                failed its checksum here (``cause``: ChecksumMismatch; nixl).
        """
        self._wait_for(lambda: layer in self._landed or self._finished, timeout,
                       f"layer {layer}")
        if layer not in self._landed:
            raise TransferFailed(f"stream {self.key!r} from {self.peer!r} finished without "
                                 f"layer {layer}", peer=self.peer)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the whole stream has landed (the writer finished it).

        Raises:
            TransferTimeout: not within ``timeout`` seconds.
            TransferFailed: a chunk of it failed its checksum here (nixl).
        """
        self._wait_for(lambda: self._finished, timeout, "completion")

    def __repr__(self) -> str:
        state = "done" if self._finished else f"{len(self._landed)} layers landed"
        return f"IncomingTransfer({self.key!r} from {self.peer!r}, {state})"


class IncomingTable:
    """Incoming streams by (peer, key), bounded; see the module docstring.

    Args:
        max_entries: transfers the engine has not asked about that may be held.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._open: dict[tuple[str, bytes], IncomingTransfer] = {}
        self._finished: OrderedDict[tuple[str, bytes], IncomingTransfer] = OrderedDict()

    def get(self, peer: str, key: bytes) -> IncomingTransfer:
        """The engine asks: the transfer, made now if no byte of it has come yet."""
        with self._lock:
            entry = self._open.get((peer, key)) or self._finished.get((peer, key))
            if entry is None:
                entry = self._open[(peer, key)] = IncomingTransfer(peer, key)
            entry.asked = True
            if entry.done():  # the engine has it now: keep only the most recent
                self._finished.pop((peer, key), None)
                self._finished[(peer, key)] = entry
                while len(self._finished) > KEEP_FINISHED:
                    self._forget_oldest_asked()
            return entry

    def _forget_oldest_asked(self) -> None:
        for k, e in self._finished.items():
            if e.asked:
                del self._finished[k]
                return
        self._finished.popitem(last=False)

    def _unasked(self) -> int:
        return sum(not e.asked for e in self._open.values()) + \
            sum(not e.asked for e in self._finished.values())

    def deliver(self, peer: str, note: Note) -> bool:
        """A note arrived; False (not taken) when the table is full of transfers the
        engine has not asked about."""
        with self._lock:
            key = (peer, note.key)
            entry = self._open.get(key) or self._finished.get(key)
            if entry is None:
                if self._unasked() >= self.max_entries:
                    return False
                entry = self._open[key] = IncomingTransfer(peer, note.key)
            if note.kind == NOTE_LAYERS:
                entry.landed(note.layers)
                return True
            entry.finished()
            if self._open.get(key) is entry:
                del self._open[key]
                self._finished[key] = entry
                while len(self._finished) > KEEP_FINISHED and any(
                        e.asked for e in self._finished.values()):
                    self._forget_oldest_asked()
            return True

    def fail(self, peer: str, key: bytes, exc: BaseException) -> bool:
        """What landed of stream ``key`` is wrong; False when the table is full of
        transfers the engine has not asked about (nothing held)."""
        with self._lock:
            entry = self._open.get((peer, key)) or self._finished.get((peer, key))
            if entry is None:
                if self._unasked() >= self.max_entries:
                    return False
                entry = self._open[(peer, key)] = IncomingTransfer(peer, key)
        entry.fail(exc)
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._open) + len(self._finished)


class Inbox:
    """What incoming writes tell this agent: notify messages for ``notifications()``
    (bounded by their bytes) and the streams of :meth:`Agent.incoming`.

    Args:
        max_notify_bytes: unread notify bytes held at most.
        max_incoming: incoming streams the engine has not asked about held at most.
    """

    def __init__(self, max_notify_bytes: int, max_incoming: int) -> None:
        self.max_notify_bytes = max_notify_bytes
        self.incoming = IncomingTable(max_incoming)
        self._lock = threading.Lock()
        self._notes: list[tuple[str, bytes]] = []
        self._bytes = 0

    def deliver(self, peer: str, raw: bytes) -> bool:
        """A backend hands over a note (``frames.encode_note``); False: not taken, the
        inbox is full (the backend refuses the write, or holds the note).

        Raises:
            RemoteProtocolError: the note is malformed.
        """
        note = decode_note(raw)
        message = note.message if note.kind in (NOTE_USER, NOTE_FINISHED) else b""
        with self._lock:
            if self._bytes + len(message) > self.max_notify_bytes:
                return False
            if note.kind != NOTE_USER and not self.incoming.deliver(peer, note):
                return False
            if message:
                self._notes.append((peer, message))
                self._bytes += len(message)
            return True

    def corrupt(self, peer: str, key: Optional[bytes], exc: BaseException) -> None:
        """A write from ``peer`` landed here with bytes that fail its checksum (a
        one-sided backend checks after landing): the stream ``key`` fails; a plain
        write (no key) is only logged, by the backend."""
        if key is not None and not self.incoming.fail(peer, key, exc):
            log.error("stream %r from %r failed its checksum, and the incoming table is "
                      "full: not recorded (%s)", key, peer, exc)

    def take_notifications(self) -> list[tuple[str, bytes]]:
        with self._lock:
            notes, self._notes, self._bytes = self._notes, [], 0
        return notes
