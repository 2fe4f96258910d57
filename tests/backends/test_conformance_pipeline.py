"""Backend conformance, pipeline: layer-wise streams, prefetch priorities and the
agent-wide cap on transfers, over every backend with real peer processes.

- A stream's layers go as the engine signals them, in any order, each once, and only
  after its CUDA event (here an object whose ``query()`` turns true later) completed.
- The receiver's ``incoming(key)`` sees each layer land: when ``wait_layer(i)`` returns,
  layer i's bytes are in its blocks, whether it asked before or after they came.
- Demand chunks overtake queued prefetch chunks; a prefetch cancelled while queued or
  while running stops at once, and no byte of it lands afterwards.
- Past ``max_inflight_transfers`` transfers queue, and all of them complete.
"""

from __future__ import annotations

import threading
import time

import pytest

import kvxfer

from kvpeer import Spec, block_bytes, layer_block_bytes, snapshot
from kvpeer import local_agent as _local_agent

LAYERED = Spec("nhd", "float32", num_blocks=256, layers=8)  # 8 KiB per block and layer
LARGE = Spec("nhd", "float32", num_blocks=2048, layers=8)


def local_agent(backend: str, spec: Spec, name: str = "local", **options):
    return _local_agent(spec, 2, name, backend=backend, **options)


@pytest.fixture(scope="module")
def peers(backend):
    from kvpeer import PeerProcess

    p = PeerProcess([LAYERED, LARGE], backend=backend)
    yield p
    p.stop()


class LateEvent:
    """Stands for a torch.cuda.Event: ``query()`` turns true ``after`` seconds on."""

    def __init__(self, after: float) -> None:
        self.at = time.monotonic() + after
        self.queried = 0

    def query(self) -> bool:
        self.queried += 1
        return time.monotonic() >= self.at


def test_layers_signalled_out_of_order_land_with_their_notes(backend, peers):
    agent, layout = local_agent(backend, LAYERED, chunk_bytes=64 << 10)
    with agent:
        peer = agent.add_peer(peers.meta[LAYERED.key])
        src, dst = list(range(0, 64)), list(range(100, 164))
        s = agent.write_stream(peer, src, dst, request=b"req-ooo")
        late = LateEvent(0.2)
        order = [5, 0, 7, 2, 6, 1, 4, 3]
        for layer in order:
            s.layer_ready(layer, late if layer == 0 else None)
        s.finish(b"all layers of req-ooo")
        status, landed = peers.call("incoming", LAYERED.key, "local", b"req-ooo", 20)
        assert (status, landed) == ("done", list(range(8)))
        s.handle.wait(10)
        assert late.queried > 1  # polled, never blocked on, and layer 0 went only after it
        for layer in range(8):
            assert peers.call("layer_blocks", LAYERED.key, layer, dst) == \
                layer_block_bytes(layout, layer, src)
        assert ("local", b"all layers of req-ooo") in peers.call("notes", LAYERED.key)


def test_a_layer_is_sent_at_most_once_and_only_if_it_is_the_streams(backend, peers):
    agent, _ = local_agent(backend, LAYERED)
    with agent:
        peer = agent.add_peer(peers.meta[LAYERED.key])
        s = agent.write_stream(peer, [1, 2], [3, 4], request=b"req-twice", layers=[0, 1])
        s.layer_ready(1)
        with pytest.raises(ValueError, match="signalled twice"):
            s.layer_ready(1)
        with pytest.raises(ValueError, match="not part of this stream"):
            s.layer_ready(5)
        with pytest.raises(TypeError, match="query"):
            s.layer_ready(0, event=object())
        s.layer_ready(0)
        s.finish()
        with pytest.raises(ValueError, match="finished twice"):
            s.finish()
        s.handle.wait(10)
        assert peers.call("incoming", LAYERED.key, "local", b"req-twice", 10) == \
            ("done", [0, 1])


def test_a_stream_that_never_finishes_fails_at_its_deadline(backend, peers):
    agent, _ = local_agent(backend, LAYERED)
    with agent:
        peer = agent.add_peer(peers.meta[LAYERED.key])
        s = agent.write_stream(peer, [1], [2], request=b"req-stuck", timeout=0.5)
        s.layer_ready(0)  # the other layers never come
        with pytest.raises(kvxfer.TransferTimeout):
            s.handle.wait()
        agent.write(peer, [1], [9]).wait(10)  # the connection carries on
        assert peer.alive


@pytest.mark.parametrize("asked", ["before", "after"])
def test_the_receiver_sees_each_layer_land(backend, peers, asked):
    agent, layout = local_agent(backend, LAYERED, name="receiver")
    with agent:
        meta = agent.metadata()
        agent.add_peer(peers.meta[LAYERED.key])
        src, dst = list(range(10, 42)), list(range(200, 232))
        want = {layer: peers.call("layer_blocks", LAYERED.key, layer, src) for layer in range(8)}
        key = b"req-" + asked.encode()
        order = [2, 0, 1, 3, 7, 4, 5, 6]
        inc = agent.incoming(key) if asked == "before" else None
        result: list = []
        writer = threading.Thread(target=lambda: result.append(peers.call(
            "stream_to", LAYERED.key, meta, src, dst, key, order, 0.05 if inc else 0.0)))
        writer.start()
        try:
            if inc is not None:
                for layer in order:
                    inc.wait_layer(layer, timeout=20)
                    assert layer_block_bytes(layout, layer, dst) == want[layer]
                inc.wait(20)
            else:
                writer.join(30)  # the writer is done: every byte has landed here
                inc = agent.incoming(key)
                inc.wait(20)  # NIXL's notifications may still be on their way
                assert inc.layers_landed == frozenset(range(8))
        finally:
            writer.join(30)
        assert result == ["ok"]
        assert block_bytes(layout, dst) == peers.call("blocks", LAYERED.key, src)
        assert agent.incoming(key) is inc  # asking again answers the same
        assert (peers.call("notes", LAYERED.key), agent.notifications()) == \
            ([], [(f"peer-{LAYERED.key}", b"streamed " + key)])


DEST = list(range(512, 1536))  # 511 and 1536 are canaries
SOURCE = list(range(0, 2048, 2))


@pytest.mark.parametrize("when", ["queued", "running"])
def test_a_cancelled_prefetch_stops_and_lands_nothing_more(backend, peers, when):
    agent, layout = local_agent(backend, LARGE, chunk_bytes=128 << 10, max_inflight=2)
    with agent:
        for region in layout.regions:
            region.view.zero_()
        peer = agent.add_peer(peers.meta[LARGE.key])
        agent.read(peer, [0], [0]).wait(10)
        blocker = agent.read(peer, SOURCE, DEST) if when == "queued" else None
        pre = agent.read(peer, list(range(1024, 2048)), DEST, priority="prefetch")
        if when == "running":
            while pre._chunks_left == len(pre.chunks) and not pre.done():
                time.sleep(0.001)  # its first chunk has landed
        assert pre.cancel() or pre.status == "done"
        at_cancel = snapshot(layout)
        if blocker is not None:
            blocker.cancel()
        time.sleep(0.3)
        if blocker is None:
            assert snapshot(layout) == at_cancel
        assert block_bytes(layout, [511, 1536]) == [bytes(len(b)) for b in
                                                    block_bytes(layout, [511, 1536])]
        agent.read(peer, [5], [5]).wait(10)
        assert peer.alive


def test_demand_reads_overtake_a_streaming_prefetch(backend, peers):
    inflight = 2
    agent, layout = local_agent(backend, LARGE, chunk_bytes=64 << 10, max_inflight=inflight)
    with agent:
        peer = agent.add_peer(peers.meta[LARGE.key])
        agent.read(peer, [0], [0]).wait(10)
        fill = list(range(1024, 2048))  # the demand's blocks are not among them
        pre = agent.read(peer, fill, fill, priority="prefetch")
        landed_before = len(pre.chunks) - pre._chunks_left
        demand = agent.read(peer, list(range(64)), list(range(64)))  # 8 chunks
        landed_at: list[int] = []
        demand.add_done_callback(lambda _: landed_at.append(len(pre.chunks) - pre._chunks_left))
        demand.wait(20)
        pre.wait(60)
        # Round-robin would have let ~8 prefetch chunks through beside the demand's 8;
        # with priorities only those already posted (and the slots racing the submit).
        assert landed_at[0] - landed_before <= 2 * inflight
        assert block_bytes(layout, list(range(64)) + fill) == \
            peers.call("blocks", LARGE.key, list(range(64)) + fill)


def test_transfers_past_the_agents_cap_queue_and_all_complete(backend, peers):
    agent, layout = local_agent(backend, LAYERED, max_inflight_transfers=2)
    with agent:
        peer = agent.add_peer(peers.meta[LAYERED.key])
        handles = [agent.read(peer, [i], [i]) for i in range(40)]
        queued = agent.queued_transfers
        dropped = agent.read(peer, [41], [41])
        dropped.cancel()  # cancelled while queued: never reaches the backend
        for h in handles:
            h.wait(30)
        assert queued > 0 and dropped.status == "cancelled"
        assert agent.queued_transfers == 0 and agent.running_transfers == 0
        assert block_bytes(layout, list(range(40))) == \
            peers.call("blocks", LAYERED.key, list(range(40)))


@pytest.mark.parametrize("prefetch_fate", ["completes", "cancelled"])
def test_a_demand_read_joins_the_prefetch_filling_its_blocks(backend, peers, prefetch_fate):
    agent, layout = local_agent(backend, LARGE, chunk_bytes=64 << 10, max_inflight=2)
    with agent:
        peer = agent.add_peer(peers.meta[LARGE.key])
        agent.read(peer, [0], [0]).wait(10)
        src, dst = list(range(1024, 2048)), list(range(0, 1024))
        pre = agent.read(peer, src, dst, priority="prefetch")
        demand = agent.read(peer, src[100:164], dst[100:164], layers=[0, 7])
        landed_at: list[int] = []
        demand.add_done_callback(lambda _: landed_at.append(len(pre.chunks) - pre._chunks_left))
        partly = agent.read(peer, [src[5], 7], [dst[5], 1500])  # block 1500 is not filled
        assert demand.chunks == () and pre.priority == "demand"  # joined, nothing re-read
        assert partly.chunks != ()  # only a fully covered read joins
        if prefetch_fate == "cancelled":
            pre.cancel()  # the demand read then fetches its blocks itself
        demand.wait(30)
        demand.wait_layer(7, timeout=0)
        if prefetch_fate == "completes":  # its chunks (layer 7's come last) went first
            assert landed_at[0] <= len(pre.chunks) // 2
        partly.wait(30)
        for layer in (0, 7):
            assert layer_block_bytes(layout, layer, dst[100:164]) == \
                peers.call("layer_blocks", LARGE.key, layer, src[100:164])
        if prefetch_fate == "completes":
            pre.wait(30)
            assert block_bytes(layout, dst) == peers.call("blocks", LARGE.key, src)


def test_staging_memory_stays_within_transfer_buffer_bytes(backend, peer_process):
    """Staged writes (every chunk packed, as for a CUDA cache) to four peers at once, with
    room for two chunks: all land, and the staging buffers never held more than that."""
    if backend == "nixl":
        pytest.skip("nixl moves registered memory itself: it has no staging buffers")
    chunk = 64 << 10
    procs = [peer_process([LAYERED], seed=20 + i, prefix=f"budget{i}") for i in range(4)]
    agent, layout = local_agent(backend, LAYERED, chunk_bytes=chunk, staged=True,
                                transfer_buffer_bytes=2 * chunk)
    with agent:
        peers = [agent.add_peer(p.meta[LAYERED.key]) for p in procs]
        src = list(range(0, 64, 2))
        handles = [agent.write(peer, src, list(range(100, 132))) for peer in peers]
        for h in handles:
            h.wait(30)
        budget = agent.backend.staging_budget
        assert budget.peak <= 2 * chunk
        for p in procs:
            assert p.call("blocks", LAYERED.key, list(range(100, 132))) == \
                block_bytes(layout, src)
    with pytest.raises(ValueError, match="at least one chunk"):
        kvxfer.Agent("tiny", chunk_bytes=chunk, transfer_buffer_bytes=chunk - 1)
