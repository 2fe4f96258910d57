"""Two real processes move KV blocks over the TCP backend: bytes, errors, deadlines."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch

import kvxfer
from kvxfer.protocol import (E_INTERNAL, E_LAYOUT, E_PROTOCOL, E_RANGE, E_SIZE, Connection,
                             Error, Hello, ReadRequest, Write)

from rawclient import events, raw_client
from kvpeer import PeerProcess, Spec, block_bytes, build_layout, local_agent, random_ids

# Byte-exactness in every layout and dtype, notifications, layer subsets, killed and stalled
# peers are in the backend conformance suite (tests/backends), which runs over TCP too.
# This file keeps what is particular to the TCP backend and its wire protocol.
SPECS = [Spec("nhd", "bfloat16"), Spec("hnd", "bfloat16"), Spec("nhd", "float16"),
         Spec("mla", "bfloat16")]  # the first is the default; the rest differ from it
BIG = Spec("nhd", "float32", num_blocks=2048)


@pytest.fixture(scope="module")
def peers():
    p = PeerProcess(SPECS)
    yield p
    p.stop()


def test_empty_block_lists_complete_at_once(peers):
    agent, _ = local_agent(SPECS[0])
    with agent:
        peer = agent.add_peer(peers.meta[SPECS[0].key])
        h = agent.read(peer, [], [])
        assert h.done() and h.status == "done" and h.nbytes == 0
        h.wait(0)
        agent.write(peer, [], []).wait(0)


def test_staged_request_larger_than_chunk_budget(peer_process):
    """Staged is the CUDA path (through pinned buffers), run here on host memory."""
    staged = True
    spec = Spec("nhd", "bfloat16", num_blocks=256)
    p = peer_process([spec], staged=staged)
    gen = torch.Generator().manual_seed(5)
    remote, local = random_ids(256, 200, gen), random_ids(256, 200, gen)
    agent, layout = local_agent(spec, chunk_bytes=8 << 10, max_inflight=2, staged=staged)
    with agent:
        peer = agent.add_peer(p.meta[spec.key])
        h = agent.read(peer, remote, local)
        assert len(h.chunks) >= 38 and max(c.nbytes for c in h.chunks) <= 8 << 10
        h.wait(30)
        w = agent.write(peer, local[:150], remote[:150], notify=b"big")
        w.wait(30)
        agent.write(peer, [], [], notify=b"no blocks").wait(10)
    assert block_bytes(layout, local) == block_bytes(build_layout(spec, 1), remote)
    assert p.call("blocks", spec.key, remote[:150]) == block_bytes(layout, local[:150])
    assert p.call("notes", spec.key) == [("local", b"big"), ("local", b"no blocks")]


def test_local_block_out_of_range_is_refused_before_sending(peers):
    spec = SPECS[0]
    agent, layout = local_agent(spec)
    with agent:
        peer = agent.add_peer(peers.meta[spec.key])
        before = peers.call("blocks", spec.key, list(range(32)))
        with pytest.raises(kvxfer.BlockOutOfRange):
            agent.write(peer, [0, 32], [1, 2])
        with pytest.raises(kvxfer.BlockOutOfRange):
            agent.read(peer, [1], [-1])
        with pytest.raises(kvxfer.BlockOutOfRange):
            agent.read(peer, [1], [0], layers=[3])
        with pytest.raises(ValueError):
            agent.read(peer, [1, 2], [0])
        assert peers.call("blocks", spec.key, list(range(32))) == before


@pytest.mark.parametrize("theirs,field", [(Spec("hnd", "bfloat16"), "block_order"),
                                          (Spec("nhd", "float16"), "dtype"),
                                          (Spec("nhd", "bfloat16", layers=2), "num_layers"),
                                          (Spec("mla", "bfloat16"), "block_order")])
def test_mismatched_layout_is_refused_naming_the_field(peers, peer_process, theirs, field):
    source = peers if theirs.key in peers.meta else peer_process([theirs])
    agent, _ = local_agent(Spec("nhd", "bfloat16"))
    with agent:
        with pytest.raises(kvxfer.LayoutMismatch) as info:
            agent.add_peer(source.meta[theirs.key])
        assert info.value.field == field


def test_write_to_a_stalled_peer_fails_in_time_and_the_connection_survives(peer_process):
    """A 64 MiB chunk is mostly unsent when its peer stops. At the deadline the write
    fails at once (the sender never blocks holding our blocks); the rest of its frame
    goes out as filler once the peer resumes, its notify is never sent, and the same
    connection carries the next write."""
    huge = Spec("nhd", "float32", num_blocks=32768)  # 96 MiB: far more than socket buffers
    p = peer_process([huge])
    agent, layout = local_agent(huge, chunk_bytes=64 << 20, max_inflight=1, transfer_timeout=1)
    with agent:
        peer = agent.add_peer(p.meta[huge.key])
        p.pause()
        try:
            h = agent.write(peer, list(range(32768)), list(range(32768)), notify=b"never")
            t0 = time.monotonic()
            with pytest.raises(kvxfer.TransferTimeout):
                h.wait()
            assert time.monotonic() - t0 < 1.5  # no 0.5 s abort: nothing was stuck
            assert h.status == "failed"
            time.sleep(0.3)
            assert peer.alive  # a cancelled frame is no reason to drop the connection
        finally:
            p.resume()
        agent.write(peer, [3], [5], notify=b"after").wait(30)
        assert p.call("notes", huge.key) == [("local", b"after")]  # never "never"
        assert p.call("blocks", huge.key, [5]) == block_bytes(layout, [3])
        assert peer.alive


def test_a_stalled_peer_is_given_up_while_a_frame_is_being_finished(peer_process,
                                                                   monkeypatch):
    from kvxfer.backends import sockio

    monkeypatch.setattr(sockio, "FILLER_STALL", 0.5)
    huge = Spec("nhd", "float32", num_blocks=32768)
    p = peer_process([huge])
    agent, _ = local_agent(huge, chunk_bytes=64 << 20, max_inflight=1, transfer_timeout=1)
    with agent:
        peer = agent.add_peer(p.meta[huge.key])
        p.pause()
        try:
            h = agent.write(peer, list(range(32768)), list(range(32768)))
            with pytest.raises(kvxfer.TransferTimeout):
                h.wait()
            deadline = time.monotonic() + 5
            while peer.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not peer.alive  # no byte moved for 0.5 s: stalled, not slow
        finally:
            p.resume()
        again = agent.add_peer(p.meta[huge.key])
        agent.write(again, [3], [5], notify=b"after").wait(10)
        assert p.call("notes", huge.key) == [("local", b"after")]


def test_wait_timeout_shorter_than_deadline_does_not_fail_the_transfer(peer_process):
    p = peer_process([SPECS[0]])
    agent, _ = local_agent(SPECS[0])
    with agent:
        peer = agent.add_peer(p.meta[SPECS[0].key])
        p.pause()
        try:
            h = agent.read(peer, [1], [1])
            with pytest.raises(kvxfer.TransferTimeout):
                h.wait(timeout=0.2)
            assert not h.done()
        finally:
            p.resume()
        h.wait(10)


def test_close_during_transfer_fails_it_promptly(peer_process):
    p = peer_process([BIG])
    agent, _ = local_agent(BIG)
    peer = agent.add_peer(p.meta[BIG.key])
    p.pause()
    try:
        h = agent.read(peer, list(range(2048)), list(range(2048)))
        t0 = time.monotonic()
        agent.close()
        assert time.monotonic() - t0 < 5
        with pytest.raises(kvxfer.TransferFailed) as info:
            h.wait(1)
        assert isinstance(info.value.cause, kvxfer.AgentClosed)
        agent.close()  # idempotent
        with pytest.raises(kvxfer.AgentClosed):
            agent.read(peer, [0], [0])
    finally:
        p.resume()


def test_small_request_is_not_stuck_behind_a_large_one(peer_process):
    p = peer_process([BIG])
    agent, _ = local_agent(BIG, chunk_bytes=4096, max_inflight=2)
    with agent:
        peer = agent.add_peer(p.meta[BIG.key])
        big = agent.read(peer, list(range(2048)), list(range(2048)))
        small = agent.read(peer, [7], [7])
        small.wait(10)
        assert not big.done()
        big.wait(30)


def test_await_a_handle(peers):
    agent, layout = local_agent(SPECS[0])

    async def go(peer):
        await agent.read(peer, [2, 3], [4, 5])

    with agent:
        asyncio.run(go(agent.add_peer(peers.meta[SPECS[0].key])))
    assert block_bytes(layout, [4, 5]) == peers.call("blocks", SPECS[0].key, [2, 3])


# ------------------------------------------------------------ a hostile client
def test_malformed_frames_fail_only_that_connection(peers):
    spec = SPECS[0]
    before = peers.call("blocks", spec.key, list(range(32)))
    agent, _ = local_agent(spec)
    with agent:
        peer = agent.add_peer(peers.meta[spec.key])
        desc = build_layout(spec, 1).descriptor.to_bytes()
        enc = Connection(expect_hello=False)

        # 1. garbage instead of a frame: an ERROR, then the connection is closed
        sock, conn = raw_client(peers.meta[spec.key])
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 32)
        ev = events(sock, conn, 1)[0]
        assert isinstance(ev, Error) and ev.code == E_PROTOCOL and "magic" in ev.message
        assert sock.recv(1) == b""
        sock.close()

        # 2. a mismatched layout in HELLO is refused
        sock, conn = raw_client(peers.meta[spec.key])
        sock.sendall(enc.encode(Hello("rogue", build_layout(Spec("hnd", "bfloat16"), 1)
                                      .descriptor.to_bytes())))
        ev = events(sock, conn, 1)[0]
        assert isinstance(ev, Error) and ev.code == E_LAYOUT
        sock.close()

        # 3. out-of-range and wrongly sized writes are refused, the connection survives
        sock, conn = raw_client(peers.meta[spec.key])
        sock.sendall(enc.encode(Hello("rogue", desc)))
        assert isinstance(events(sock, conn, 1)[0], Hello)
        block = build_layout(spec, 1).block_bytes * 2
        payload = b"\xff" * 2 * block
        for frame in (Write(1, 0, (0,), ((40, 1),), block, True, b"x"),
                      Write(2, 0, (0,), ((0, 1),), block - 2, True, b"y"),
                      Write(3, 0, (0, 0), ((0, 1),), 2 * block, True, b"z")):
            sock.sendall(b"".join(bytes(b) for b in enc.send(frame, [payload[:frame.payload_len]])))
        sock.sendall(enc.encode(ReadRequest(4, 0, (0,), ((2**32 - 1, 1),))))
        errors = events(sock, conn, 4)
        assert [(e.request_id, e.code) for e in errors] == [(1, E_RANGE), (2, E_SIZE),
                                                            (3, E_RANGE), (4, E_RANGE)]

        # 4. a truncated frame, then the socket closes: that connection alone ends
        sock.sendall(enc.encode(ReadRequest(5, 0, (0,), ((1, 1),)))[:-3])
        sock.close()

        agent.read(peer, [1, 2], [1, 2]).wait(10)  # our connection is unaffected
    assert peers.call("blocks", spec.key, list(range(32))) == before
    assert peers.call("notes", spec.key) == []


def _hostile_session(agent: kvxfer.Agent) -> tuple[socket.socket, Connection, Connection]:
    sock, conn = raw_client(agent.metadata())
    enc = Connection(expect_hello=False)
    sock.sendall(enc.encode(Hello("rogue", agent.layout.descriptor.to_bytes())))
    assert isinstance(events(sock, conn, 1)[0], Hello)
    return sock, conn, enc


@pytest.mark.parametrize("staged", [False, True], ids=["zero-copy", "staged"])
def test_requests_are_bounded_before_any_work(monkeypatch, staged):
    """An 800 KB READ naming one 64-block run 100,000 times once made the server build a
    1.5 TiB answer; a small READ on the staged path asked for 15.6 GiB of staging. Now
    both are refused before anything is allocated, and the connection serves on."""
    monkeypatch.setattr(kvxfer.memory, "MAX_CHUNK_BYTES", 1 << 20)  # a small frame limit
    spec = Spec("nhd", "float32", num_blocks=2048)  # 3 layers x 2048 blocks x 1 KiB: 6 MiB
    server, layout = local_agent(spec, seed=1, name="server", staged=staged)
    with server:
        sock, conn, enc = _hostile_session(server)
        sock.sendall(enc.encode(ReadRequest(1, 0, (0,), ((0, 64),) * 100_000)))
        sock.sendall(enc.encode(ReadRequest(2, 0, (0, 1, 2), ((0, 2048),))))  # 6 MiB > 1 MiB
        sock.sendall(enc.encode(ReadRequest(3, 0, (0,), ((0, 8), (4, 8)))))  # overlapping runs
        block = layout.block_bytes * 2
        frame = Write(4, 0, (0,), ((5, 1), (5, 1)), 2 * block, True, b"twice")
        sock.sendall(b"".join(bytes(b) for b in enc.send(frame, [b"\xee" * 2 * block])))
        sock.sendall(enc.encode(ReadRequest(5, 0, (0,), ((3, 2),))))  # a fair request
        answers = events(sock, conn, 5)
        assert [(e.request_id, e.code) for e in answers[:4]] == \
            [(1, E_RANGE), (2, E_RANGE), (3, E_RANGE), (4, E_RANGE)]
        assert "more than once" in answers[0].message and "limit" in answers[1].message
        assert answers[4].request_id == 5 and answers[4].payload_len == 2 * block
        sock.close()
        assert server.notifications() == []
        assert block_bytes(layout, [5]) == block_bytes(build_layout(spec, 1), [5])


def test_an_internal_error_reaches_the_requester_and_the_connection_serves_on(monkeypatch):
    spec = SPECS[0]
    server, _ = local_agent(spec, seed=1, name="server")
    client, layout = local_agent(spec, seed=2, name="client")
    from kvxfer.memory import RegisteredMemory

    def flaky(real):
        def call(self, layers, runs, *rest):
            if self is server._memory and tuple(runs) == ((13, 1),):
                raise RuntimeError("simulated bug while serving block 13")
            return real(self, layers, runs, *rest)
        return call

    for name in ("host_buffers", "pack_into", "unpack_from"):  # whichever path serves it
        monkeypatch.setattr(RegisteredMemory, name, flaky(getattr(RegisteredMemory, name)))
    with server, client:
        peer = client.add_peer(server.metadata())
        with pytest.raises(kvxfer.TransferFailed) as info:
            client.read(peer, [13], [0]).wait(10)
        cause = info.value.cause
        assert isinstance(cause, kvxfer.RemoteError) and cause.code == E_INTERNAL
        assert "simulated bug while serving block 13" in str(cause)
        with pytest.raises(kvxfer.TransferFailed) as info:
            client.write(peer, [1], [13], notify=b"never").wait(10)  # a write's payload too
        assert info.value.cause.code == E_INTERNAL
        client.read(peer, [4, 5], [4, 5]).wait(10)  # same connection, still serving
        assert peer.alive and server.notifications() == []
        assert block_bytes(layout, [4, 5]) == block_bytes(build_layout(spec, 1), [4, 5])
