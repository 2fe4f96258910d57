"""TransferGate: an agent-wide cap on transfers in flight; the rest wait their turn.

Theory of operation
-------------------
Every transfer holds memory while it runs: its handle and plan, a slot in its
connection's queue, staging buffers while its chunks move. Under load (a decode worker
prefetching for a thousand requests) that must stay bounded, and a submission must
never fail or be dropped for load. So the Agent passes every handle through a gate::

    submit(handle) -> gate.admit -- fewer than max_inflight running --> backend.submit
                                 \\- else: queued (demand before prefetch, FIFO within)
    handle done (any way) -> its slot frees -> the oldest queued demand (else prefetch)
                                               that is still pending goes to the backend

- A queued handle is an ordinary pending handle: it can be waited on, cancelled (it then
  never reaches the backend) and it fails at its deadline like any other.
- ``queued`` and ``running`` tell the engine the depth of the queue.

A demand read whose blocks an in-flight prefetch is already filling from the same
remote blocks does not move them again: :class:`PrefetchFills` knows what each pending
prefetch fills, and a :class:`JoinedRead` follows those prefetches (promoted to demand)
instead of reading itself.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Optional, Sequence

from .handle import DEMAND, DONE, TransferHandle
from .plan import Chunk, Run

Submit = Callable[[TransferHandle], None]


class TransferGate:
    """Admits at most ``max_inflight`` transfers at once; see the module docstring.

    Args:
        max_inflight: transfers running (submitted to the backend, not yet done).
    """

    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight_transfers must be at least 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self._lock = threading.Lock()
        self._running = 0
        self._local = threading.local()  # draining: this thread is in _drain
        self._demand: deque[tuple[TransferHandle, Submit]] = deque()
        self._prefetch: deque[tuple[TransferHandle, Submit]] = deque()

    @property
    def running(self) -> int:
        """Transfers handed to the backend and not yet done."""
        return self._running

    @property
    def queued(self) -> int:
        """Transfers waiting for a slot (some may have been cancelled meanwhile)."""
        with self._lock:
            return sum(h.active for h, _ in (*self._demand, *self._prefetch))

    def admit(self, handle: TransferHandle, submit: Submit) -> None:
        """Run ``submit(handle)`` now if a slot is free, else once one frees."""
        with self._lock:
            queue = self._demand if handle.priority == DEMAND else self._prefetch
            queue.append((handle, submit))
        self._drain()

    def _release(self, _: TransferHandle) -> None:
        with self._lock:
            self._running -= 1
        self._drain()

    def _drain(self) -> None:
        """Start queued transfers while slots are free. A transfer that finishes inside
        its own submit (a dead peer) releases its slot re-entrantly: that call returns
        at once and this loop goes on, so a long queue never recurses."""
        if getattr(self._local, "draining", False):
            return
        self._local.draining = True
        try:
            while True:
                with self._lock:
                    if self._running >= self.max_inflight:
                        return
                    nxt = self._pop()
                    if nxt is None:
                        return
                    self._running += 1
                handle, submit = nxt
                handle.add_done_callback(self._release)
                submit(handle)
        finally:
            self._local.draining = False

    def _pop(self) -> tuple[TransferHandle, Submit] | None:
        for queue in (self._demand, self._prefetch):
            while queue:
                handle, submit = queue.popleft()
                if handle.active:
                    return handle, submit
        return None


class PrefetchFills:
    """Which local blocks in-flight prefetch reads are filling, from which remote blocks.

    Per peer: local block -> (remote block, prefetch handle), while the prefetch is
    pending. A demand read whose every (local, remote) pair an active prefetch is
    filling, for all its layers, joins those prefetches instead of moving the bytes again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fills: dict[str, dict[int, tuple[int, TransferHandle]]] = {}

    def add(self, peer: str, runs: Sequence[Run], handle: TransferHandle) -> None:
        with self._lock:
            table = self._fills.setdefault(peer, {})
            for lo, ro, n in runs:
                for i in range(n):
                    table[lo + i] = (ro + i, handle)
        handle.add_done_callback(lambda h: self._remove(peer, runs, h))

    def _remove(self, peer: str, runs: Sequence[Run], handle: TransferHandle) -> None:
        with self._lock:
            table = self._fills.get(peer, {})
            for lo, _, n in runs:
                for b in range(lo, lo + n):
                    if b in table and table[b][1] is handle:
                        del table[b]
            if not table:
                self._fills.pop(peer, None)

    def covering(self, peer: str, runs: Sequence[Run],
                 layers: Sequence[int]) -> Optional[dict[TransferHandle, list[Run]]]:
        """The prefetches filling every pair of ``runs`` for all ``layers`` (with the
        pairs each fills), or None if any pair is not covered."""
        wanted = set(layers)
        found: dict[TransferHandle, list[Run]] = {}
        with self._lock:
            table = self._fills.get(peer)
            if not table:
                return None
            for lo, ro, n in runs:
                for i in range(n):
                    fill = table.get(lo + i)
                    if fill is None or fill[0] != ro + i or not fill[1].active \
                            or not wanted <= set(fill[1].layers):
                        return None
                    found.setdefault(fill[1], []).append((lo + i, ro + i, 1))
        return found


def needed_chunks(source: TransferHandle, pairs: Sequence[Run],
                  layers: Sequence[int]) -> list[Chunk]:
    """The chunks of ``source`` that carry any of ``pairs`` in any of ``layers``."""
    wanted, blocks = set(layers), {lo for lo, _, _ in pairs}
    return [c for c in source.chunks if wanted.intersection(c.layers)
            and any(b in blocks for lo, _, n in c.runs for b in range(lo, lo + n))]


class JoinedRead(TransferHandle):
    """A demand read served by prefetches already filling its blocks.

    It counts the prefetches' chunks that carry its blocks (those chunks go first, and
    the prefetches are promoted to demand): ``wait_layer(i)`` returns once each chunk of
    layer i it needs has landed, ``wait()`` once all have, not when the whole prefetch
    is done. If a prefetch fails or is cancelled by its owner, ``refetch(pairs)``
    submits a read of the pairs it was filling, and this handle counts that read
    instead. Cancelling this handle leaves the prefetches running (the engine asked for
    them on their own).
    """

    def __init__(self, request_id: int, peer: str, layers: Sequence[int], deadline: float,
                 sources: dict[TransferHandle, list[Run]],
                 refetch: Callable[[list[Run]], TransferHandle]) -> None:
        super().__init__(request_id, peer, "read", layers, (), b"", deadline, depends=1)
        self._refetch = refetch
        plans = [(src, pairs, needed_chunks(src, pairs, self.layers))
                 for src, pairs in sources.items()]
        with self._cond:  # one count per needed chunk (per layer of ours it carries)
            self._deps_left = sum(len(need) for _, _, need in plans)
            self._layer_left = dict.fromkeys(self.layers, 0)
            for _, _, need in plans:
                for chunk in need:
                    self._add_layers(chunk, 1)
        for src, pairs, need in plans:
            self._follow(src, pairs, need)

    def _add_layers(self, chunk: Chunk, sign: int) -> None:
        for layer in chunk.layers:
            if layer in self._layer_left:
                self._layer_left[layer] += sign

    def _mine(self, chunk: Chunk) -> tuple[int, ...]:
        return tuple(layer for layer in chunk.layers if layer in self._layer_left)

    def _follow(self, source: TransferHandle, pairs: list[Run], need: list[Chunk]) -> None:
        lock = threading.Lock()
        waiting = {c.index: c for c in need}  # needed chunks of source not yet counted

        def on_chunk(chunk: Chunk) -> None:
            with lock:
                if waiting.pop(chunk.index, None) is None:
                    return
            self._count(self._mine(chunk), 0, 0, deps=1)

        def on_done(h: TransferHandle) -> None:
            if h.status == DONE or not self.active:
                return  # every needed chunk was counted as it landed
            with lock:
                left = list(waiting.values())
                waiting.clear()  # nothing more counts from this source
            if left:
                self._switch(pairs, left)

        source.promote(urgent=list(waiting))
        source.watch_chunks(on_chunk)
        source.add_done_callback(on_done)

    def _switch(self, pairs: list[Run], left: list[Chunk]) -> None:
        """A source failed with ``left`` chunks uncounted: read the pairs ourselves."""
        try:
            again = self._refetch(pairs)
        except Exception as exc:  # noqa: BLE001 - the fallback could not start
            self.fail(exc)
            return
        if not again.chunks:  # it joined another prefetch: count it whole, once done
            again = _Whole(again)
        need = list(again.chunks)
        with self._cond:  # swap the failed source's uncounted chunks for the new read's
            self._deps_left += len(need) - len(left)
            for chunk in left:
                self._add_layers(chunk, -1)
            for chunk in need:
                self._add_layers(chunk, 1)
        if isinstance(again, _Whole):
            again.follow(self)
        else:
            self._follow(again, pairs, need)


class _Whole:
    """A fallback read that itself joined prefetches: counted as one chunk of every
    layer, when it is done."""

    def __init__(self, handle: TransferHandle) -> None:
        self.handle = handle
        self.chunks = (Chunk(0, handle.layers, (), 0),)

    def follow(self, joined: JoinedRead) -> None:
        def on_done(h: TransferHandle) -> None:
            if h.status == DONE:
                joined._count(joined._mine(self.chunks[0]), 0, 0, deps=1)
            elif h.error is not None:
                joined.fail(h.error)

        self.handle.add_done_callback(on_done)
