"""Feed a :class:`~kvxfer.prefix.index.PrefixIndex` from one engine's vLLM KV events.

Theory of operation
-------------------
One owned thread reads a ZMQ SUB socket (frames ``[topic][seq][payload]``, see
:mod:`kvxfer.prefix.event_wire`) and applies each batch to the index as one worker::

    first message    -> if seq > 0 and there is a replay endpoint, replay [0, seq) first
                        (a router that starts after the engine learns what the engine's
                        buffer still holds; any unbroken run of batches ending at seq-1
                        is safe to apply, a missing older part only under-reports)
    seq == last + 1  -> apply
    seq <= last      -> the publisher restarted (a PUB never repeats a number; vLLM's
                        counter starts again at 0): its cache is empty, clear the
                        worker, then treat batches 0..seq-1 as a gap. (A restart whose
                        first batch we see carries last+1 or more is indistinguishable
                        from a continuation; the protocol has no publisher epoch.)
    seq >  last + 1  -> gap: ask the replay ROUTER for [last+1, seq) over a DEALER:
                          request  [b""][start seq, 8 B big-endian]
                          replies  [b""][topic][seq][payload] ... [b""][b""][-1][b""]
                        (vLLM's layout; the older one without the topic frame,
                        [b""][seq][payload] ... [b""][-1][b""], is read too)
                        apply what came back in order; if the gap cannot be filled
                        (no replay endpoint, timeout, batches aged out) clear the
                        worker, since a lost BlockRemoved would leave stale locations.

Stored blocks of consecutive events (and of every message drained in one wake-up)
of one tier and KV-cache group (``group_idx``; None = 0) are coalesced into one bulk
index insert; a removal or clear flushes them first, so the order of effects is the
order of events. A payload that is not a KV-event batch, or an event that cannot be
read or applied, is logged, counted and skipped (the batch's other events are
applied); the thread goes on.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvxfer.errors import AgentClosed
from kvxfer.prefix.event_wire import (CLEARED, REMOVED, STORED, BatchDecoder, MalformedEvents,
                                      event_kind, medium_tier)
from kvxfer.prefix.index import PrefixIndex
from kvxfer.prefix.keys import as_key, as_keys
from ..logs import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class SubscriberConfig:
    """Tuning of a :class:`KVEventSubscriber`; read by its thread, set before start()."""

    # How often (ms) the thread wakes to check for close().
    poll_ms: int = 50
    # How long to wait for the replay ROUTER's answer to one gap, and how many times to
    # ask before the gap counts as lost (a publisher busy flooding answers late).
    replay_timeout_s: float = 2.0
    replay_attempts: int = 3
    # Clear the worker when a gap cannot be replayed (keeps the index conservative).
    clear_on_unrecovered_gap: bool = True
    # On the first message, replay the engine's buffered history before it.
    replay_on_join: bool = True
    # Most messages drained per wake-up before their stores are flushed.
    max_drain: int = 512
    # ZMQ receive high-water mark (messages); 0 = unbounded.
    rcvhwm: int = 100_000


@dataclass(slots=True)
class SubscriberStats:
    """Counters of a subscriber; written by its thread, copied out by stats()."""

    # Batches applied (live and replayed), events in them, blocks stored / removed.
    batches: int = 0
    events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    # Messages or events that were malformed and skipped.
    malformed: int = 0
    # Gaps found; batches recovered by replay (including history replayed on joining).
    gaps: int = 0
    replayed: int = 0
    joined_history: int = 0
    # Gaps that replay could not fill; publisher restarts (seq back to 0).
    unrecovered_gaps: int = 0
    restarts: int = 0
    # Last sequence number whose effects are in the index (-1: none yet).
    applied_seq: int = -1


class KVEventSubscriber:
    """A ZMQ SUB on one engine's KV-event stream, feeding ``index`` as ``worker``.

    Args:
        index: the index to update.
        worker: the worker id the engine's blocks are stored under.
        endpoint: the engine's PUB endpoint, e.g. ``tcp://127.0.0.1:5557``.
        replay_endpoint: the engine's replay ROUTER endpoint, if it has one.
        topic: topic prefix to subscribe to ("" = all).
        config: tuning; defaults to :class:`SubscriberConfig`.
    """

    def __init__(self, index: PrefixIndex, worker: Hashable, endpoint: str,
                 replay_endpoint: str | None = None, topic: str = "",
                 config: SubscriberConfig | None = None) -> None:
        self.index = index
        self.worker = worker
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.config = config or SubscriberConfig()
        self._stats = SubscriberStats()      # written by the thread only
        self._cond = threading.Condition()   # guards publishing stats to waiters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: Any = None                # owned by the thread once started
        self._zmq: Any = None
        self._closed = False
        self._last_seq: int | None = None    # thread-only
        self._pending: list[Any] = []        # thread-only: hashes awaiting a bulk store
        self._starts: list[tuple[int, Any]] = []  # (offset in _pending, parent hash)
        self._pending_tier = "gpu"
        self._pending_group = 0
        self._warned_media: set[str] = set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> KVEventSubscriber:
        """Connect and start the reader thread.

        Returns:
            self.

        Raises:
            AgentClosed: after close().
            RuntimeError: started twice.
            zmq.ZMQError: a bad endpoint.
        """
        if self._closed:
            raise AgentClosed("KVEventSubscriber is closed")
        if self._thread is not None:
            raise RuntimeError("KVEventSubscriber already started")
        import zmq
        self._zmq = zmq
        sub = zmq.Context.instance().socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
            sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode("utf-8"))
            sub.connect(self.endpoint)
        except Exception:
            sub.close(linger=0)
            raise
        self._sub = sub
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-kv-events-{self.worker}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, join it and close its sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.poll_ms / 1000 + self.config.replay_timeout_s
                              + 5.0)
            if self._thread.is_alive():  # pragma: no cover - only if the index hangs
                log.error("KV-event subscriber thread for %r did not stop", self.worker)
        elif self._sub is not None:
            self._sub.close(linger=0)

    def __enter__(self) -> KVEventSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> SubscriberStats:
        """A copy of the counters."""
        with self._cond:
            return dataclasses.replace(self._stats)

    def wait_applied(self, seq: int, timeout: float) -> bool:
        """Block until batch ``seq`` (or a later one) is in the index.

        Sequence numbers are the publisher's; after a publisher restart they start
        over, so wait only for numbers of the current publisher.

        Returns:
            True if it is, False on timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._stats.applied_seq >= seq, timeout)

    # ------------------------------------------------------------ thread

    def _run(self) -> None:
        zmq, sub = self._zmq, self._sub
        decoder = BatchDecoder()
        try:
            while not self._stop.is_set():
                if not sub.poll(self.config.poll_ms):
                    continue
                for _ in range(self.config.max_drain):
                    try:
                        # Zero-copy frames: msgspec decodes straight from ZMQ's buffer.
                        frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message([f.buffer for f in frames], decoder)
                self._flush()
                with self._cond:
                    self._stats.applied_seq = -1 if self._last_seq is None else self._last_seq
                    self._cond.notify_all()
        except Exception:  # pragma: no cover - a bug; logged so it is not silent
            log.exception("KV-event subscriber for %r stopped on an error", self.worker)
        finally:
            sub.close(linger=0)

    def _on_message(self, frames: list[memoryview], decoder: BatchDecoder) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._stats.malformed += 1
            log.warning("skipping a KV-event message of %d frames (want topic, seq, payload)",
                        len(frames))
            return
        seq = int.from_bytes(bytes(frames[1]), "big", signed=True)
        if seq < 0:
            self._stats.malformed += 1
            log.warning("skipping a KV-event message with negative sequence %d", seq)
            return
        last = self._last_seq
        if last is not None and seq <= last:
            # A PUB never sends a number twice: a fresh publisher counts from 0 again.
            log.info("KV-event publisher of %r restarted (seq %d after %d); clearing its "
                     "blocks", self.worker, seq, last)
            self._stats.restarts += 1
            self._flush()
            self.index.clear(self.worker)
            last = -1
        if last is not None and seq > last + 1:
            self._recover(last + 1, seq, decoder)
        elif last is None and seq > 0 and self.replay_endpoint and self.config.replay_on_join:
            self._join_history(seq, decoder)
        self._apply(frames[2], decoder)
        self._last_seq = seq

    def _recover(self, start: int, until: int, decoder: BatchDecoder) -> None:
        self._stats.gaps += 1
        self._flush()
        got = None
        for _ in range(self.config.replay_attempts if self.replay_endpoint else 0):
            got = self._fetch_replay(start, until)
            if got is not None or self._stop.is_set():  # answered (whole or not), or closing
                break
        if got is not None and len(got) == until - start:
            for seq in sorted(got):
                self._apply(got[seq], decoder)
            self._stats.replayed += len(got)
            return
        self._stats.unrecovered_gaps += 1
        log.warning("KV events %d..%d of %r were lost and could not be replayed%s", start,
                    until - 1, self.worker,
                    "; clearing its blocks" if self.config.clear_on_unrecovered_gap else "")
        if self.config.clear_on_unrecovered_gap:
            self.index.clear(self.worker)

    def _join_history(self, until: int, decoder: BatchDecoder) -> None:
        got = self._fetch_replay(0, until) or {}
        start = until
        while start - 1 in got:  # the unbroken run that ends just before `until`
            start -= 1
        for seq in range(start, until):
            self._apply(got[seq], decoder)
        self._stats.replayed += until - start
        self._stats.joined_history += until - start
        log.info("joined the KV events of %r at seq %d; replayed %d earlier batches",
                 self.worker, until, until - start)

    def _fetch_replay(self, start: int, until: int) -> dict[int, bytes] | None:
        zmq = self._zmq
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        got: dict[int, bytes] = {}
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
            waited = 0.0
            step = min(self.config.poll_ms / 1000, self.config.replay_timeout_s)
            while waited < self.config.replay_timeout_s and not self._stop.is_set():
                if not dealer.poll(int(step * 1000)):
                    waited += step
                    continue
                frames = dealer.recv_multipart()
                # vLLM: [b"", topic, seq, payload]; older publishers: [b"", seq, payload].
                if frames and frames[0] == b"" and len(frames) in (3, 4):
                    seq_frame, payload = frames[-2], frames[-1]
                else:
                    seq_frame, payload = b"", b""
                if len(seq_frame) != 8:
                    self._stats.malformed += 1
                    log.warning("skipping a malformed replay reply of %d frames (want "
                                "[b'', topic, seq, payload])", len(frames))
                    continue
                seq = int.from_bytes(seq_frame, "big", signed=True)
                if seq == -1:
                    return got
                if start <= seq < until:
                    got[seq] = payload
            log.warning("replay of KV events from %d for %r timed out", start, self.worker)
            return None
        finally:
            dealer.close(linger=0)

    def _apply(self, payload: bytes | memoryview, decoder: BatchDecoder) -> None:
        try:
            _, events = decoder.decode(payload)
        except MalformedEvents as exc:
            self._stats.malformed += 1
            log.warning("skipping a malformed KV-event payload from %r: %s", self.worker, exc)
            return
        if decoder.skipped:
            self._stats.malformed += len(decoder.skipped)
            log.warning("skipping %d unreadable KV events of %r (applying the rest of the "
                        "batch): %s", len(decoder.skipped), self.worker,
                        "; ".join(decoder.skipped[:3]))
        self._stats.batches += 1
        self._stats.events += len(events)
        for event in events:
            kind = event_kind(event)
            if kind == STORED:
                tier = self._tier(event.medium)
                group = event.group_idx or 0
                if tier != self._pending_tier or group != self._pending_group:
                    self._flush()
                    self._pending_tier, self._pending_group = tier, group
                self._starts.append((len(self._pending), event.parent_block_hash))
                self._pending.extend(event.block_hashes)
            elif kind == REMOVED:
                self._flush()
                try:
                    self.index.remove(self.worker, event.block_hashes, self._tier(event.medium),
                                      event.group_idx or 0)
                except (TypeError, ValueError) as exc:
                    self._stats.malformed += 1
                    log.warning("skipping a BlockRemoved event of %r: %s", self.worker, exc)
                    continue
                self._stats.blocks_removed += len(event.block_hashes)
            elif kind == CLEARED:
                self._flush()
                self.index.clear(self.worker)

    def _flush(self) -> None:
        if not self._pending:
            self._starts.clear()
            return
        hashes, starts = self._pending, self._starts
        self._pending, self._starts = [], []
        try:
            keys = as_keys(hashes)
            parents = np.empty_like(keys)
            parents[1:] = keys[:-1]
            has_parent = np.ones(keys.shape[0], dtype=bool)
            for offset, parent in starts:
                if parent is None:
                    has_parent[offset] = False
                else:
                    parents[offset] = as_key(parent)
            self.index.store_arrays(self.worker, keys, parents, has_parent, self._pending_tier,
                                    group=self._pending_group)
        except (TypeError, ValueError):
            self._store_each(hashes, starts)  # find the bad event; keep the good ones
            return
        self._stats.blocks_stored += len(hashes)

    def _store_each(self, hashes: list[Any], starts: list[tuple[int, Any]]) -> None:
        ends = [offset for offset, _ in starts[1:]] + [len(hashes)]
        for (offset, parent), end in zip(starts, ends):
            try:
                self.index.store(self.worker, hashes[offset:end], self._pending_tier, parent,
                                 group=self._pending_group)
            except (TypeError, ValueError) as exc:
                self._stats.malformed += 1
                log.warning("skipping a BlockStored event of %r: %s", self.worker, exc)
                continue
            self._stats.blocks_stored += end - offset

    def _tier(self, medium: str | None) -> str:
        tier = medium_tier(medium)
        if tier is None:
            if medium not in self._warned_media:
                self._warned_media.add(str(medium))
                log.warning("unknown KV-event medium %r; indexing it as 'remote'", medium)
            return "remote"
        return tier


__all__ = ["KVEventSubscriber", "SubscriberConfig", "SubscriberStats"]
