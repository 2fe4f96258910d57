"""TransferHandle: the caller's view of one read or write, with per-layer readiness.

A handle is created by the Agent, filled in by a backend's threads (``chunk_done``,
``fail``) and watched by the engine (``wait``, ``wait_layer``, ``done``, ``await``).

States: PENDING -> DONE | FAILED | CANCELLED, once.

Memory safety: a backend holds ``data_lock`` around each system call that moves this
transfer's bytes in or out of the engine's blocks, and checks ``active`` between calls.
A failure, cancel or deadline changes the state only while holding that lock, so once a
waiter sees the failure no further byte of the transfer touches the engine's blocks
(a read's late bytes are drained, a write's later bytes are never sent). If the lock
is not free within ``ABORT_AFTER`` seconds, a backend call is stuck (a dead link): the
handle calls the backend's ``abort`` hook, which breaks the connection so the call
returns at once.

One-sided backends post operations that the NIC carries out with no call of ours in
progress. For them ``fail`` then calls the backend's ``quiesce`` hook, which returns
only once every operation posted for this transfer has finished or failed (bounded:
past its bound the backend breaks the connection, which ends them). So "once ``fail`` or
``cancel`` returns, nothing touches the transfer's blocks" holds over every backend.

Done-callbacks run on whichever thread finished the transfer (usually a backend's). One
that raises is logged with the request id and changes nothing else: the backend thread
and every other transfer on the connection carry on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Generator, Sequence

from .errors import TransferFailed, TransferTimeout
from .heads import HeadExchange
from .logs import get_logger
from .plan import Chunk, Message

log = get_logger("kvxfer.handle")

PENDING, DONE, FAILED, CANCELLED = "pending", "done", "failed", "cancelled"
DEMAND, PREFETCH = "demand", "prefetch"
PRIORITIES = (DEMAND, PREFETCH)
READY, LATER, POLL = 0, 1, 2  # readiness() of a part
ABORT_AFTER = 0.5  # seconds a failure waits for a backend call before aborting it


class TransferHandle:
    """One read or write in flight. Returned by :meth:`Agent.read` / :meth:`Agent.write`."""

    def __init__(self, request_id: int, peer: str, op: str, layers: Sequence[int],
                 chunks: Sequence[Chunk], notify: bytes, deadline: float,
                 source_event: Any = None, messages: Sequence[Message] = (),
                 priority: str = DEMAND, depends: int = 0) -> None:
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        self.request_id = request_id
        self.peer = peer
        self.op = op  # "read" or "write"
        self.layers = tuple(layers)
        self.chunks = tuple(chunks)
        # Notes for the receiving agent that go after the chunks they announce (a write's
        # notify, a stream's layer and finish notes); each is acknowledged by the peer.
        self.messages = tuple(messages)
        self.notify = notify
        self.deadline = deadline  # time.monotonic() after which the transfer fails
        self.nbytes = sum(c.nbytes for c in chunks)
        # "demand" parts go before queued "prefetch" parts on the same connection; a
        # prefetch is promoted (promote()) when a demand read joins it.
        self.priority = priority
        # A write's engine event (torch.cuda.Event, or anything with query()): no byte of
        # the source is read before it has completed. None once it has.
        self._source_event = source_event
        self.data_lock = threading.Lock()  # held by a backend per call touching local blocks
        self.abort: Callable[[], None] | None = None  # set by the backend: break a stuck call
        # Set by the backend: wakes its sender when a part may have become ready (a layer
        # signalled, a promotion). Called from the engine's thread; must not block.
        self.kick: Callable[[], None] | None = None
        # Set by a one-sided backend: returns once nothing it posted for this transfer
        # can touch local memory (see the module docstring). Called by fail(), unlocked.
        self.quiesce: Callable[["TransferHandle"], None] | None = None
        # Set by the Agent (read with stream=): runs on the completing thread just before
        # the handle becomes done (the engine's stream is made to wait there).
        self.before_done: Callable[[], None] | None = None
        # Set by the Agent before submit, for a peer of another tensor-parallel shard:
        # which of each side's KV heads the chunks move. None: whole blocks.
        self.heads: HeadExchange | None = None
        self._cond = threading.Condition()
        self._state = PENDING
        self._error: TransferFailed | None = None
        self._failing: tuple[str, TransferFailed] | None = None  # set by the first fail()
        self._chunks_left = len(chunks)
        self._messages_left = len(self.messages)
        # Other transfers this one waits for (a demand read that joined prefetches:
        # kvxfer.pipeline.JoinedRead); each also counts once per layer.
        self._deps_left = depends
        self._layer_left = dict.fromkeys(self.layers, depends)
        self._landed: list[Chunk] = []  # chunks done, for watch_chunks (reads only)
        self._chunk_watchers: list[Callable[[Chunk], None]] = []
        # Chunk indices a demand read joining this prefetch needs: they go first.
        self.urgent: frozenset[int] = frozenset()
        for chunk in chunks:
            for layer in chunk.layers:
                self._layer_left[layer] += 1
        self._callbacks: list[Callable[["TransferHandle"], Any]] = []
        if not chunks and not self.messages and not depends:
            self._state = DONE

    # -------------------------------------------------------- backend-facing
    @property
    def active(self) -> bool:
        """Still pending and not being failed: a backend should keep working on it."""
        return self._state == PENDING and self._failing is None

    def readiness(self, part: Chunk | Message) -> int:
        """Whether ``part`` may go now: READY; LATER (a signal will come, with a kick);
        POLL (a CUDA event is pending: look again shortly). Never blocks."""
        event = self._source_event
        if event is None or isinstance(part, Message):
            return READY
        if not event.query():
            return POLL
        self._source_event = None
        return READY

    def note(self, message: Message) -> bytes:
        """The encoded note ``message`` carries (see :mod:`kvxfer.protocol.frames`)."""
        return message.note

    def promote(self, urgent: Sequence[int] = ()) -> None:
        """Make a prefetch a demand transfer: its queued parts overtake other prefetches,
        the chunks numbered in ``urgent`` (a joining demand read's) before its others."""
        self.urgent = self.urgent | frozenset(urgent)
        if self.priority != DEMAND or urgent:
            self.priority = DEMAND
            self._kick()

    def _kick(self) -> None:
        kick = self.kick
        if kick is not None:
            kick()

    def chunk_done(self, chunk: Chunk) -> None:
        """A chunk has landed (read) or been acknowledged by the peer (write)."""
        self._count(chunk.layers, chunks=1, messages=0, chunk=chunk)

    def message_done(self) -> None:
        """One of ``messages`` was acknowledged by the peer."""
        self._count((), chunks=0, messages=1)

    def _count(self, layers: Sequence[int], chunks: int, messages: int, deps: int = 0,
               chunk: Chunk | None = None) -> None:
        with self._cond:
            if not self.active:  # done, failed, or being failed: nothing more counts
                return
            for layer in layers:
                self._layer_left[layer] -= 1
            if chunk is not None and self.op == "read":
                self._landed.append(chunk)
            self._chunks_left -= chunks
            self._messages_left -= messages
            self._deps_left -= deps
            finished = self._chunks_left <= 0 and self._messages_left <= 0 \
                and self._deps_left <= 0
            if finished:
                if self.before_done is not None:
                    self.before_done()
                self._state = DONE
            self._cond.notify_all()
            watchers = list(self._chunk_watchers) if chunk is not None else []
        for fn in watchers:
            self._call_watcher(fn, chunk)
        if finished:
            self._run_callbacks()

    def watch_chunks(self, fn: Callable[[Chunk], None]) -> None:
        """Call ``fn(chunk)`` as each chunk of a read lands (at once for those in)."""
        with self._cond:
            self._chunk_watchers.append(fn)
            landed = list(self._landed)
        for chunk in landed:
            self._call_watcher(fn, chunk)

    def _call_watcher(self, fn: Callable[[Chunk], None], chunk: Chunk | None) -> None:
        try:
            fn(chunk)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - as for done-callbacks
            log.exception("chunk watcher %r of %s #%d raised; ignored", fn, self.op,
                          self.request_id)

    def fail(self, exc: BaseException, state: str = FAILED) -> bool:
        """Fail the transfer with ``exc`` (wrapped in TransferFailed); first call wins.

        Returns only when no backend call is moving this transfer's bytes (see the
        module docstring); must not be called while holding ``data_lock``.
        """
        if not isinstance(exc, TransferFailed):
            exc = TransferFailed(f"{self.op} #{self.request_id} with {self.peer!r} failed: {exc}",
                                 peer=self.peer, request_id=self.request_id, cause=exc)
        with self._cond:
            if self._state != PENDING:
                return False
            if self._failing is None:  # the first caller names the cause, whoever locks first
                self._failing = (state, exc)
        # From here ``active`` is False: no backend call that moves this transfer's
        # bytes starts any more. Wait for the one in progress, then for what a one-sided
        # backend posted, and only then let waiters see the failure.
        self._lock_data()
        self.data_lock.release()
        if self.quiesce is not None:
            self.quiesce(self)
        with self._cond:
            if self._state != PENDING:
                return False
            self._state, self._error = self._failing
            self._cond.notify_all()
        self._run_callbacks()
        return True

    def _lock_data(self) -> None:
        if self.data_lock.acquire(timeout=ABORT_AFTER):
            return
        if self.abort is not None:
            self.abort()
        self.data_lock.acquire()

    def expire(self) -> bool:
        """Fail with TransferTimeout (the deadline has passed)."""
        return self.fail(TransferTimeout(
            f"{self.op} #{self.request_id} with {self.peer!r} passed its deadline",
            peer=self.peer, request_id=self.request_id))

    def _run_callbacks(self) -> None:
        with self._cond:
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self._call(cb)

    def _call(self, cb: Callable[["TransferHandle"], Any]) -> None:
        try:
            cb(self)
        except Exception:  # noqa: BLE001 - the engine's error, not the transfer's
            log.exception("done-callback %r of %s #%d with %r raised; ignored", cb, self.op,
                          self.request_id, self.peer)

    # ----------------------------------------------------------- public API
    @property
    def status(self) -> str:
        """"pending", "done", "failed" or "cancelled"."""
        return self._state

    @property
    def error(self) -> TransferFailed | None:
        return self._error

    def done(self) -> bool:
        """True once the transfer finished, successfully or not."""
        return self._state != PENDING

    def cancel(self) -> bool:
        """Stop the transfer; after this returns no further byte lands in local memory.

        Returns:
            True if it was pending and is now cancelled.
        """
        return self.fail(TransferFailed(f"{self.op} #{self.request_id} was cancelled",
                                        peer=self.peer, request_id=self.request_id),
                         state=CANCELLED)

    def _wait_for(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        now = time.monotonic()
        limit = self.deadline if timeout is None else min(self.deadline, now + timeout)
        with self._cond:
            while not ready() and self._state == PENDING:
                left = limit - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if ready():
                return
            if self._error is not None:
                raise self._error
        if time.monotonic() >= self.deadline:
            self.expire()
            if self._error is not None:
                raise self._error
            if ready():
                return
        raise TransferTimeout(f"{what} of {self.op} #{self.request_id} not ready within "
                              f"{timeout} s (the transfer goes on)", peer=self.peer,
                              request_id=self.request_id)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the transfer is done.

        Args:
            timeout: seconds to wait; None waits until the transfer's own deadline.

        Raises:
            TransferFailed: the transfer failed (``.cause`` says why) or was cancelled.
            TransferTimeout: the deadline passed (the transfer is then failed), or
                ``timeout`` passed first (the transfer goes on).
        """
        self._wait_for(lambda: self._state == DONE, timeout, "completion")

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Block until every chunk of ``layer`` has landed (read) or been acknowledged.

        Raises:
            ValueError: the layer is not part of this transfer.
            TransferFailed, TransferTimeout: as for :meth:`wait`.
        """
        if layer not in self._layer_left:
            raise ValueError(f"layer {layer} is not part of this transfer ({self.layers})")
        self._wait_for(lambda: self._layer_left[layer] <= 0 or self._state == DONE,
                       timeout, f"layer {layer}")

    def add_done_callback(self, fn: Callable[["TransferHandle"], Any]) -> None:
        """Call ``fn(handle)`` once it is done (at once if it already is), from any thread."""
        with self._cond:
            if self._state == PENDING:
                self._callbacks.append(fn)
                return
        self._call(fn)

    def __await__(self) -> Generator[Any, None, None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake(_: "TransferHandle") -> None:
            if loop.is_closed():  # the awaiting task is gone (asyncio.run ended, say)
                return
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
            except RuntimeError:  # the loop closed between the check and the call
                pass

        self.add_done_callback(wake)
        yield from fut.__await__()
        self.wait(timeout=0)

    def __repr__(self) -> str:
        return (f"TransferHandle(#{self.request_id} {self.op} {self.peer!r}, {self._state}, "
                f"{self.nbytes} B in {len(self.chunks)} chunks)")
