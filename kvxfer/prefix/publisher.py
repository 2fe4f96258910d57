"""Publish KV events in vLLM's wire format, for engines that emit none of their own.

Theory of operation
-------------------
``publish()`` queues a batch; one owned thread encodes it (see
:mod:`kvxfer.prefix.event_wire`), numbers it and sends ``[topic][seq][payload]`` on a
PUB socket, keeping the last ``buffer_steps`` payloads. Between batches the same thread
answers replay requests on a ROUTER socket exactly as vLLM's publisher does::

    in:  [client id][b""][start seq, 8 B big-endian]
    out: [client id][b""][topic][seq][payload]   for every buffered seq >= start
         [client id][b""][b""][-1 as 8 B][b""]   end marker

Sequence numbers start at 0, so a subscriber sees a new publisher on the same
endpoint as a restart. Sockets are bound in the constructor (``*`` ports resolve to
real ones, see :attr:`endpoint`) and closed by the thread when close() joins it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvxfer.errors import AgentClosed
from kvxfer.prefix.event_wire import ALIASES, ENCODINGS, Event, encode_batch
from ..logs import get_logger

log = get_logger(__name__)

_END = (-1).to_bytes(8, "big", signed=True)


@dataclass(slots=True)
class PublisherConfig:
    """Tuning of a :class:`KVEventPublisher`; fixed at construction."""

    # Batches kept for replay.
    buffer_steps: int = 10_000
    # ZMQ send high-water mark (messages); 0 = unbounded.
    sndhwm: int = 100_000
    # How batches are encoded (see event_wire.ENCODINGS): "vllm" (array batch,
    # "type"-keyed map events, as vLLM sends), "array" (older vLLM), "map", ...
    encoding: str = "vllm"
    # Batches waiting in publish()'s queue before publish() blocks.
    max_queue: int = 100_000
    # DP rank stamped on every batch (the third batch field); None leaves it out.
    data_parallel_rank: int | None = None


class KVEventPublisher:
    """PUB (+ optional replay ROUTER) of vLLM-format KV-event batches.

    Args:
        endpoint: where to bind the PUB socket, e.g. ``tcp://127.0.0.1:*``.
        replay_endpoint: where to bind the replay ROUTER, or None for no replay.
        topic: topic frame of every message.
        config: tuning; defaults to :class:`PublisherConfig`.

    Raises:
        ValueError: an unknown encoding.
        zmq.ZMQError: an endpoint that cannot be bound.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", replay_endpoint: str | None = None,
                 topic: str = "", config: PublisherConfig | None = None) -> None:
        import zmq
        self.config = config or PublisherConfig()
        if ALIASES.get(self.config.encoding, self.config.encoding) not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS) + sorted(ALIASES)},"
                             f" got {self.config.encoding!r}")
        self._zmq = zmq
        self._topic = topic.encode("utf-8")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.config.max_queue)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=self.config.buffer_steps)
        self._seq = 0                                  # thread-only after start
        self._closed = False
        ctx = zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)                # owned by the thread
        self._router: Any = None
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, self.config.sndhwm)
            self._pub.bind(endpoint)
            self.endpoint: str = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._router = ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                # A whole replay plus its end marker must fit, or ZMQ drops the tail
                # (its acks lag by up to HWM/2 messages, hence twice the buffer).
                self._router.setsockopt(zmq.SNDHWM, 2 * (self.config.buffer_steps + 1))
                self._router.bind(replay_endpoint)
                self.replay_endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        except Exception:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="kvxfer-kv-publisher",
                                        daemon=True)
        self._thread.start()

    def publish(self, events: Sequence[Event], ts: float | None = None) -> None:
        """Queue one batch of events.

        Args:
            events: BlockStored / BlockRemoved / AllBlocksCleared, in order.
            ts: the batch's timestamp; now if None.

        Raises:
            AgentClosed: after close().
        """
        if self._closed:
            raise AgentClosed("KVEventPublisher is closed")
        self._queue.put((list(events), time.time() if ts is None else ts))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued batch has been sent.

        Returns:
            True if the queue drained, False on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        """Send what is queued, stop the thread, join it, close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():  # pragma: no cover - a send blocked on a full queue
            log.error("KV-event publisher thread did not stop")

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            while True:
                if self._router is not None:
                    while self._router.poll(0):
                        self._serve_replay()
                try:
                    item = self._queue.get(timeout=0.005)
                except queue.Empty:
                    continue
                try:
                    if item is None:
                        return
                    events, ts = item
                    payload = encode_batch(events, ts, self.config.data_parallel_rank,
                                           self.config.encoding)
                    seq = self._seq
                    self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])
                    self._buffer.append((seq, payload))
                    self._seq += 1
                except Exception:
                    log.exception("failed to publish a KV-event batch; dropped")
                finally:
                    self._queue.task_done()
        finally:
            self._close_sockets()

    def _serve_replay(self) -> None:
        frames = self._router.recv_multipart()
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            log.warning("ignoring a malformed replay request of %d frames", len(frames))
            return
        client, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._router.send_multipart([client, b"", self._topic, seq.to_bytes(8, "big"),
                                             payload])
        self._router.send_multipart([client, b"", b"", _END, b""])

    def _close_sockets(self) -> None:
        self._pub.close(linger=500)  # let already-sent batches leave
        if self._router is not None:
            self._router.close(linger=0)


__all__ = ["KVEventPublisher", "PublisherConfig"]
