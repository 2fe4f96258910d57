"""KVEventSubscriber over real ZMQ sockets on 127.0.0.1: encodings, replay, restarts,
malformed input. A hand-driven PUB + ROUTER pair plays the vLLM engine."""

from __future__ import annotations

import logging
import time

import pytest
import zmq
from prefix_vllm_mirror import ARRAY, COMBO_IDS, COMBOS, MAP, VLLM

from kvxfer.errors import AgentClosed
from kvxfer.prefix.event_wire import AllBlocksCleared, BlockStored
from kvxfer.prefix.index import PrefixIndex
from kvxfer.prefix.publisher import KVEventPublisher
from kvxfer.prefix.subscriber import KVEventSubscriber, SubscriberConfig

FAST = SubscriberConfig(poll_ms=10, replay_timeout_s=3.0)


class FakeEngine:
    """A vLLM-like publisher driven step by step from the test thread."""

    def __init__(self, replay: bool = True) -> None:
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.router = None
        self.replay_endpoint = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind("tcp://127.0.0.1:*")
            self.replay_endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.seq = 0
        self.sent: dict[int, bytes] = {}

    def send(self, payload: bytes, seq: int | None = None, topic: bytes = b"") -> int:
        seq = self.seq if seq is None else seq
        self.pub.send_multipart([topic, seq.to_bytes(8, "big", signed=True), payload])
        self.sent[seq] = payload
        self.seq = seq + 1
        return seq

    def sync(self, sub: KVEventSubscriber, wait_until) -> None:
        """Send empty batches until the subscriber has one (ZMQ's slow joiner),
        answering the history replay it asks for when it joins."""
        def seen() -> bool:
            self.send(ARRAY.batch())
            if self.router is not None and self.router.poll(0):
                self.serve_replay(self.sent)
            return sub.stats().batches > 0
        assert wait_until(seen, timeout=10)
        assert sub.wait_applied(self.seq - 1, timeout=5)

    def serve_replay(self, batches: dict[int, bytes], timeout_ms: int = 5000,
                     topic: bytes | None = b"") -> list[bytes]:
        """Answer one replay request as vLLM does ([b"", topic, seq, payload]), or as
        older publishers did without the topic frame (topic=None)."""
        assert self.router.poll(timeout_ms), "no replay request arrived"
        frames = self.router.recv_multipart()
        client, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
        head = [client, b""] if topic is None else [client, b"", topic]
        for seq in sorted(batches):
            if seq >= start:
                self.router.send_multipart(head + [seq.to_bytes(8, "big"), batches[seq]])
        end = [b""] if topic is not None else []
        self.router.send_multipart([client, b""] + end +
                                   [(-1).to_bytes(8, "big", signed=True), b""])
        return frames

    def close(self) -> None:
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


@pytest.fixture
def engine():
    eng = FakeEngine()
    yield eng
    eng.close()


@pytest.mark.parametrize("vllm", COMBOS, ids=COMBO_IDS)
def test_every_vllm_encoding_drives_the_index(engine, wait_until, vllm):
    idx = PrefixIndex()
    with KVEventSubscriber(idx, "w", engine.endpoint, config=FAST) as sub:
        engine.sync(sub, wait_until)
        digests = [bytes([i]) * 32 for i in range(1, 4)]
        s = engine.send(vllm.batch(vllm.stored([11, 12, 13]),
                                   vllm.stored(digests, parent=13, medium="CPU")))
        assert sub.wait_applied(s, 5)
        assert idx.match([11, 12, 13]) == {"w": 3}
        assert idx.match_tiers([11, 12, 13, *digests], "w") == ["gpu"] * 3 + ["cpu"] * 3
        assert idx.chain(digests[-1])[0] == 11
        s = engine.send(vllm.batch(vllm.BlockRemoved([12], None)))
        assert sub.wait_applied(s, 5)
        assert idx.match([11, 12, 13]) == {"w": 1} and idx.locations(12) == []
        s = engine.send(vllm.batch(vllm.AllBlocksCleared()))
        assert sub.wait_applied(s, 5)
        assert len(idx) == 0 and idx.locations(digests[0]) == []
        stats = sub.stats()
        assert stats.blocks_stored == 6 and stats.blocks_removed == 1 and stats.malformed == 0


@pytest.mark.parametrize("topic", [b"kv@0", None], ids=["vllm-layout", "no-topic-frame"])
def test_a_dropped_batch_is_recovered_by_replay(engine, wait_until, topic):
    idx = PrefixIndex()
    with KVEventSubscriber(idx, "w", engine.endpoint, engine.replay_endpoint,
                           config=FAST) as sub:
        engine.sync(sub, wait_until)
        first = engine.send(ARRAY.batch(ARRAY.stored([1, 2])))
        dropped = ARRAY.batch(ARRAY.stored([3, 4], parent=2))
        lost = engine.seq
        engine.seq += 1                                   # never sent on the PUB
        later = ARRAY.batch(ARRAY.BlockRemoved([4], None))
        after = engine.send(later)
        request = engine.serve_replay({first: b"x", lost: dropped, after: later}, topic=topic)
        assert request[1:] == [b"", lost.to_bytes(8, "big")]
        assert sub.wait_applied(after, 5)
        assert idx.match([1, 2, 3, 4]) == {"w": 3}        # stored by replay, 4 removed live
        stats = sub.stats()
        assert (stats.gaps, stats.replayed, stats.unrecovered_gaps) == (1, 1, 0)


def test_a_replay_answered_late_is_asked_again_before_the_gap_counts_as_lost(engine,
                                                                             wait_until):
    idx = PrefixIndex()
    config = SubscriberConfig(poll_ms=10, replay_timeout_s=0.3, replay_attempts=3)
    with KVEventSubscriber(idx, "w", engine.endpoint, engine.replay_endpoint,
                           config=config) as sub:
        engine.sync(sub, wait_until)
        lost = engine.seq
        engine.seq += 1                                   # never sent on the PUB
        after = engine.send(ARRAY.batch(ARRAY.stored([7])))
        assert engine.router.poll(5000)
        engine.router.recv_multipart()                    # a busy publisher: no answer
        engine.serve_replay({lost: ARRAY.batch(ARRAY.stored([5, 6])),
                             after: ARRAY.batch(ARRAY.stored([7]))})
        assert sub.wait_applied(after, 5)
        assert idx.match([5, 6]) == {"w": 2} and idx.match([7]) == {"w": 1}
        stats = sub.stats()
        assert (stats.gaps, stats.replayed, stats.unrecovered_gaps) == (1, 1, 0)


def test_an_unrecoverable_gap_clears_the_worker(wait_until):
    engine = FakeEngine(replay=False)
    idx = PrefixIndex()
    try:
        with KVEventSubscriber(idx, "w", engine.endpoint, config=FAST) as sub:
            engine.sync(sub, wait_until)
            engine.send(ARRAY.batch(ARRAY.stored([1, 2, 3])))
            engine.seq += 1                               # lost: may have removed 1..3
            s = engine.send(ARRAY.batch(ARRAY.stored([7])))
            assert sub.wait_applied(s, 5)
            assert idx.match([1]) == {} and idx.match([7]) == {"w": 1}
            assert sub.stats().unrecovered_gaps == 1
    finally:
        engine.close()


def rebind(endpoint: str, replay: str) -> KVEventPublisher:
    """A new publisher on a closed one's ports (ZMQ releases them asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return KVEventPublisher(endpoint, replay)
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_a_publisher_restart_clears_the_worker(wait_until):
    idx = PrefixIndex()
    first = KVEventPublisher(replay_endpoint="tcp://127.0.0.1:*")
    endpoint, replay = first.endpoint, first.replay_endpoint
    with KVEventSubscriber(idx, "w", endpoint, replay, config=FAST) as sub:
        def seen(pub: KVEventPublisher, n: int) -> bool:
            pub.publish([])
            return sub.stats().batches >= n
        assert wait_until(lambda: seen(first, 1), timeout=10)
        first.publish([BlockStored([1, 2, 3])])
        for _ in range(200):  # a long-lived engine: the new counter starts far below
            first.publish([])
        assert first.flush(5) and sub.wait_applied(201, 5)
        assert idx.match([1, 2, 3]) == {"w": 3}
        first.close()
        second = rebind(endpoint, replay)                   # same endpoints, seq from 0
        try:
            assert wait_until(lambda: seen(second, 1) and sub.stats().restarts == 1, 10)
            second.publish([BlockStored([9])])
            assert second.flush(5) and wait_until(lambda: idx.match([9]) == {"w": 1})
            assert idx.match([1, 2, 3]) == {}
        finally:
            second.close()


def test_a_malformed_payload_is_logged_and_skipped(engine, wait_until, caplog):
    idx = PrefixIndex()
    caplog.set_level(logging.WARNING, logger="kvxfer.prefix.subscriber")
    with KVEventSubscriber(idx, "w", engine.endpoint, config=FAST) as sub:
        engine.sync(sub, wait_until)
        engine.send(b"\x93\xffnot msgpack")
        engine.pub.send_multipart([b"", b"\x00" * 8])     # two frames, no payload
        engine.send(ARRAY.batch(ARRAY.stored([1, 2]), ["BlockStored", "oops"]))
        s = engine.send(ARRAY.batch(ARRAY.stored([5, 6])))
        assert sub.wait_applied(s, 5)
        # The bad event is skipped; the good one in its batch is kept.
        assert idx.match([5, 6]) == {"w": 2} and idx.match([1, 2]) == {"w": 2}
        assert sub.stats().malformed == 3
        assert "malformed KV-event payload" in caplog.text
        assert "skipping 1 unreadable KV events" in caplog.text
        s = engine.send(MAP.batch(MAP.stored([8])))
        assert sub.wait_applied(s, 5) and idx.match([8]) == {"w": 1}


def test_unknown_medium_is_indexed_as_remote_and_topics_filter(engine, wait_until):
    idx = PrefixIndex()
    with KVEventSubscriber(idx, "w", engine.endpoint, topic="kv@a", config=FAST) as sub:
        def seen() -> bool:
            engine.send(ARRAY.batch(), topic=b"kv@a")
            return sub.stats().batches > 0
        assert wait_until(seen, timeout=10)
        engine.send(ARRAY.batch(ARRAY.stored([1])), topic=b"kv@b")   # not ours
        s = engine.send(ARRAY.batch(ARRAY.stored([2], medium="TAPE")), topic=b"kv@a")
        assert sub.wait_applied(s, 5)
        assert idx.match([1]) == {} and idx.match_tiers([2], "w") == ["remote"]


def test_close_joins_the_thread_and_is_idempotent(engine):
    sub = KVEventSubscriber(PrefixIndex(), "w", engine.endpoint, config=FAST).start()
    thread = sub._thread
    sub.close()
    sub.close()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(AgentClosed):
        sub.start()
    KVEventSubscriber(PrefixIndex(), "w", engine.endpoint).close()  # never started


def test_publisher_events_reach_the_index_end_to_end(wait_until):
    idx = PrefixIndex()
    with KVEventPublisher() as pub, \
            KVEventSubscriber(idx, 7, pub.endpoint, config=FAST) as sub:
        assert wait_until(lambda: (pub.publish([]), sub.stats().batches > 0)[1], timeout=10)
        pub.publish([BlockStored([1, 2]), AllBlocksCleared(), BlockStored([3], None)])
        assert pub.flush(5) and wait_until(lambda: idx.match([3]) == {7: 1})
        assert idx.match([1]) == {}


def test_kv_cache_groups_are_stored_and_removed_apart(engine, wait_until):
    idx = PrefixIndex()
    with KVEventSubscriber(idx, "w", engine.endpoint, config=FAST) as sub:
        engine.sync(sub, wait_until)
        # A hybrid model: the same hashes in a full-attention and a sliding-window group.
        s = engine.send(VLLM.batch(VLLM.stored([1, 2, 3], group_idx=0),
                                   VLLM.stored([1, 2, 3], group_idx=1),
                                   VLLM.BlockRemoved([1], None, 1)))
        assert sub.wait_applied(s, 5)
        assert idx.match([1, 2, 3]) == {"w": 3}
        assert idx.match([1, 2, 3], group=1) == {} and idx.match([2, 3], group=1) == {"w": 2}
        assert idx.locations(1, group=1) == [] and idx.chain(3, group=1) == [2, 3]


def test_a_late_subscriber_replays_the_engines_history(engine, wait_until):
    history = {engine.send(VLLM.batch(VLLM.stored([1, 2]))): None,
               engine.send(VLLM.batch(VLLM.stored([3], parent=2))): None,
               engine.send(VLLM.batch(VLLM.BlockRemoved([3], None))): None}
    assert len(history) == 3
    idx = PrefixIndex()
    with KVEventSubscriber(idx, "w", engine.endpoint, engine.replay_endpoint,
                           config=FAST) as sub:
        engine.sync(sub, wait_until)
        assert idx.match([1, 2, 3]) == {"w": 2}
        stats = sub.stats()
        assert stats.joined_history >= 3 and stats.unrecovered_gaps == 0


def test_a_malformed_replay_reply_is_counted_and_the_gap_cleared(engine, wait_until):
    idx = PrefixIndex()
    with KVEventSubscriber(idx, "w", engine.endpoint, engine.replay_endpoint,
                           config=SubscriberConfig(poll_ms=10, replay_timeout_s=0.5)) as sub:
        engine.sync(sub, wait_until)
        engine.send(VLLM.batch(VLLM.stored([1])))
        engine.seq += 1
        s = engine.send(VLLM.batch(VLLM.stored([2])))
        assert engine.router.poll(5000)
        client = engine.router.recv_multipart()[0]
        engine.router.send_multipart([client, b"", b"t", b"short", b"x"])   # seq not 8 bytes
        engine.router.send_multipart([client, b"only"])
        assert sub.wait_applied(s, 5)
        stats = sub.stats()
        assert stats.malformed == 2 and stats.unrecovered_gaps == 1
        assert idx.match([1]) == {} and idx.match([2]) == {"w": 1}   # cleared, then applied
