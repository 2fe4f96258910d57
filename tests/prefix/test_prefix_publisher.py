"""KVEventPublisher: vLLM's PUB framing and replay ROUTER protocol, over real sockets.

Replies follow vLLM's ZmqEventPublisher._service_replay: ``[b"", topic, seq, payload]``
per batch, then ``[b"", b"", -1, b""]``."""

from __future__ import annotations

import msgspec
import pytest
import zmq
from prefix_vllm_mirror import ARRAY, COMBO_IDS, COMBOS, VLLM

from kvxfer.errors import AgentClosed
from kvxfer.prefix.event_wire import BlockRemoved, BlockStored
from kvxfer.prefix.publisher import KVEventPublisher, PublisherConfig


def replay(endpoint: str, start: int, timeout_ms: int = 5000) -> list[list[bytes]]:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            assert dealer.poll(timeout_ms), "replay did not answer"
            frames = dealer.recv_multipart()
            out.append(frames)
            if frames[2] == (-1).to_bytes(8, "big", signed=True):
                return out
    finally:
        dealer.close(linger=0)


@pytest.mark.parametrize("vllm", COMBOS, ids=COMBO_IDS)
def test_replay_answers_like_vllm(vllm):
    cfg = PublisherConfig(buffer_steps=3, encoding=vllm.name, data_parallel_rank=1)
    with KVEventPublisher(replay_endpoint="tcp://127.0.0.1:*", topic="kv", config=cfg) as pub:
        for i in range(5):
            pub.publish([BlockStored([i]), BlockRemoved([i])], ts=float(i))
        assert pub.flush(5)
        frames = replay(pub.replay_endpoint, 3)
        assert [len(f) for f in frames] == [4] * 3
        assert [f[0] for f in frames] == [b""] * 3
        assert [f[1] for f in frames] == [b"kv", b"kv", b""]
        assert [int.from_bytes(f[2], "big", signed=True) for f in frames] == [3, 4, -1]
        assert frames[-1][3] == b""
        batch = vllm.decoder.decode(frames[0][3])
        assert batch.ts == 3.0 and batch.data_parallel_rank == 1
        assert batch.events[0].block_hashes == [3]
        # Older batches have left the 3-deep buffer.
        assert [int.from_bytes(f[2], "big", signed=True)
                for f in replay(pub.replay_endpoint, 0)] == [2, 3, 4, -1]


def test_live_messages_are_topic_seq_payload():
    with KVEventPublisher(topic="kv@x") as pub:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.endpoint)
        try:
            frames = None
            for _ in range(500):                      # ZMQ slow joiner: retry
                pub.publish([BlockStored([42])])
                if sub.poll(20):
                    frames = sub.recv_multipart()
                    break
            assert frames is not None
            assert frames[0] == b"kv@x" and len(frames[1]) == 8
            # The default encoding is vLLM's own: an array batch of "type"-keyed events.
            assert VLLM.decoder.decode(frames[2]).events[0].block_hashes == [42]
            with pytest.raises(msgspec.DecodeError):
                ARRAY.decoder.decode(frames[2])
        finally:
            sub.close(linger=0)


def test_malformed_replay_request_is_ignored_and_close_is_idempotent():
    pub = KVEventPublisher(replay_endpoint="tcp://127.0.0.1:*")
    pub.publish([BlockStored([1])])
    assert pub.flush(5)
    bad = zmq.Context.instance().socket(zmq.DEALER)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(pub.replay_endpoint)
    bad.send_multipart([b"", b"short"])
    assert not bad.poll(200)
    bad.close(linger=0)
    assert [int.from_bytes(f[2], "big", signed=True)
            for f in replay(pub.replay_endpoint, 0)] == [0, -1]
    pub.close()
    pub.close()
    assert not pub._thread.is_alive()
    with pytest.raises(AgentClosed):
        pub.publish([])
    with pytest.raises(ValueError):
        KVEventPublisher(config=PublisherConfig(encoding="xml"))
