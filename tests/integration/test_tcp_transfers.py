"""Two real processes move KV blocks over the TCP backend: bytes, errors, deadlines."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
import torch

import kvxfer
from kvxfer.agent import decode_metadata
from kvxfer.backends.base import parse_host_port
from kvxfer.protocol import (E_LAYOUT, E_PROTOCOL, E_RANGE, E_SIZE, Connection, Error, Hello,
                             ReadRequest, Write)

from kvpeer import (DTYPES, PeerProcess, Spec, block_bytes, build_layout, local_agent, random_ids,
                    snapshot)

SPECS = [Spec(c, d) for c in ("nhd", "hnd", "flashinfer", "split", "mla") for d in DTYPES]
BIG = Spec("nhd", "float32", num_blocks=2048)


@pytest.fixture(scope="module")
def peers():
    p = PeerProcess(SPECS)
    yield p
    p.stop()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_read_is_byte_exact_in_every_layout_and_dtype(peers, spec):
    gen = torch.Generator().manual_seed(hash(spec.key) % 1000)
    remote, local = random_ids(32, 12, gen), random_ids(32, 12, gen)
    agent, layout = local_agent(spec)
    with agent:
        before = [r.view.clone() for r in layout.regions]
        peer = agent.add_peer(peers.meta[spec.key])
        agent.read(peer, remote, local).wait(10)
    assert block_bytes(layout, local) == peers.call("blocks", spec.key, remote)
    untouched = sorted(set(range(32)) - set(local))
    for region, old in zip(layout.regions, before):
        assert torch.equal(region.view[untouched].view(torch.uint8),
                           old[untouched].view(torch.uint8))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_write_is_byte_exact_in_every_layout_and_dtype(peers, spec):
    gen = torch.Generator().manual_seed(7 + hash(spec.key) % 1000)
    local, remote = random_ids(32, 9, gen), random_ids(32, 9, gen)
    agent, layout = local_agent(spec, seed=3)
    with agent:
        peer = agent.add_peer(peers.meta[spec.key])
        agent.write(peer, local, remote).wait(10)
    assert peers.call("blocks", spec.key, remote) == block_bytes(layout, local)


def test_layer_subset_moves_only_those_layers(peers):
    spec = SPECS[0]
    agent, layout = local_agent(spec)
    with agent:
        before = snapshot(layout)
        peer = agent.add_peer(peers.meta[spec.key])
        h = agent.read(peer, [5, 6, 9], [1, 2, 3], layers=[2, 0])
        h.wait_layer(0, timeout=10)
        h.wait(10)
        assert h.layers == (0, 2)
        with pytest.raises(ValueError):
            h.wait_layer(1)
    theirs = peers.call("blocks", spec.key, [5, 6, 9])
    mine = block_bytes(layout, [1, 2, 3])
    after = snapshot(layout)
    for r, region in enumerate(layout.regions):
        if region.layer == 1:
            assert after[r] == before[r]
        else:
            assert mine[r] == theirs[r]


def test_notifications_arrive_after_the_write_and_not_for_refused_writes(peers):
    spec = SPECS[1]
    agent, layout = local_agent(spec)
    with agent:
        peer = agent.add_peer(peers.meta[spec.key])
        agent.write(peer, [0, 1], [4, 5], notify=b"req-42 done").wait(10)
        agent.write(peer, [], [], notify=b"just a message").wait(10)
        refused = agent.write(peer, [0], [10_000], notify=b"never")
        with pytest.raises(kvxfer.TransferFailed):
            refused.wait(10)
        notes = peers.call("notes", spec.key)
    assert notes == [("local", b"req-42 done"), ("local", b"just a message")]


def test_empty_block_lists_complete_at_once(peers):
    agent, _ = local_agent(SPECS[0])
    with agent:
        peer = agent.add_peer(peers.meta[SPECS[0].key])
        h = agent.read(peer, [], [])
        assert h.done() and h.status == "done" and h.nbytes == 0
        h.wait(0)
        agent.write(peer, [], []).wait(0)


@pytest.mark.parametrize("staged", [False, True], ids=["zero-copy", "staged"])
def test_request_larger_than_chunk_budget(peer_process, staged):
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
    assert block_bytes(layout, local) == block_bytes(build_layout(spec, 1), remote)
    assert p.call("blocks", spec.key, remote[:150]) == block_bytes(layout, local[:150])
    assert p.call("notes", spec.key) == [("local", b"big")]


def test_remote_block_out_of_range_fails_the_handle_and_touches_nothing(peers):
    spec = SPECS[0]
    agent, layout = local_agent(spec)
    with agent:
        before = snapshot(layout)
        peer = agent.add_peer(peers.meta[spec.key])
        h = agent.read(peer, [3, 31, 32], [0, 1, 2])
        with pytest.raises(kvxfer.TransferFailed) as info:
            h.wait(10)
        assert isinstance(info.value.cause, kvxfer.RemoteError)
        assert info.value.cause.code == E_RANGE and "[31, 33)" in str(info.value.cause)
        assert snapshot(layout) == before
        agent.read(peer, [3], [0]).wait(10)  # the connection is still good
        assert peer.alive


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


def test_peer_killed_mid_transfer_fails_within_deadline(peer_process):
    p = peer_process([BIG])
    agent, layout = local_agent(BIG, chunk_bytes=4096, max_inflight=1, transfer_timeout=30)
    with agent:
        peer = agent.add_peer(p.meta[BIG.key])
        h = agent.read(peer, list(range(2048)), list(range(2048)))
        h.wait_layer(0, timeout=10)
        os.kill(p.proc.pid, signal.SIGSTOP)
        assert not h.done(), "transfer finished before the peer was stopped; make it larger"
        os.kill(p.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(kvxfer.TransferFailed) as info:
            h.wait()
        assert time.monotonic() - t0 < 5
        assert isinstance(info.value.cause, kvxfer.PeerUnreachable)
        assert not peer.alive
        with pytest.raises(kvxfer.TransferFailed):
            agent.read(peer, [0], [0]).wait(5)


def test_stalled_peer_times_out_and_late_bytes_never_land(peer_process):
    p = peer_process([BIG])
    agent, layout = local_agent(BIG, transfer_timeout=0.5)
    with agent:
        peer = agent.add_peer(p.meta[BIG.key])
        before = snapshot(layout)
        os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            h = agent.read(peer, list(range(0, 2048, 2)), list(range(1024)))
            with pytest.raises(kvxfer.TransferTimeout):
                h.wait()
            assert h.status == "failed"
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        time.sleep(0.5)  # the peer now answers the old request; its bytes must be dropped
        assert snapshot(layout) == before
        agent.read(peer, [4], [4], timeout=10).wait()  # and the connection still works


def test_write_to_a_stalled_peer_stops_reading_our_blocks_and_resets(peer_process):
    huge = Spec("nhd", "float32", num_blocks=32768)  # 96 MiB: far more than socket buffers
    p = peer_process([huge])
    agent, _ = local_agent(huge, chunk_bytes=64 << 20, max_inflight=1, transfer_timeout=1)
    with agent:
        peer = agent.add_peer(p.meta[huge.key])
        os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            h = agent.write(peer, list(range(32768)), list(range(32768)), notify=b"never")
            t0 = time.monotonic()
            with pytest.raises(kvxfer.TransferTimeout):
                h.wait()
            assert time.monotonic() - t0 < 3
            assert h.status == "failed"
            # The sender was blocked inside sendmsg holding our blocks; the only safe
            # way out is to reset the connection, after which nothing reads them.
            deadline = time.monotonic() + 3
            while peer.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not peer.alive
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        assert p.call("notes", huge.key) == []  # half a write is never announced
        again = agent.add_peer(p.meta[huge.key])
        agent.write(again, [3], [5], notify=b"after").wait(10)
        assert p.call("notes", huge.key) == [("local", b"after")]


def test_wait_timeout_shorter_than_deadline_does_not_fail_the_transfer(peer_process):
    p = peer_process([SPECS[0]])
    agent, _ = local_agent(SPECS[0])
    with agent:
        peer = agent.add_peer(p.meta[SPECS[0].key])
        os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            h = agent.read(peer, [1], [1])
            with pytest.raises(kvxfer.TransferTimeout):
                h.wait(timeout=0.2)
            assert not h.done()
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        h.wait(10)


def test_close_during_transfer_fails_it_promptly(peer_process):
    p = peer_process([BIG])
    agent, _ = local_agent(BIG)
    peer = agent.add_peer(p.meta[BIG.key])
    os.kill(p.proc.pid, signal.SIGSTOP)
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
        os.kill(p.proc.pid, signal.SIGCONT)


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
def _raw_client(meta: bytes) -> tuple[socket.socket, Connection]:
    sock = socket.create_connection(parse_host_port(decode_metadata(meta).address), timeout=10)
    return sock, Connection()


def _events(sock: socket.socket, conn: Connection, n: int) -> list:
    out = []
    while len(out) < n:
        ev = conn.next_event()
        if ev.__class__.__name__ == "_Sentinel":
            data = sock.recv(65536)
            conn.receive_data(data)
            if not data:
                out.append("EOF")
            continue
        out.append(ev)
    return out


def test_malformed_frames_fail_only_that_connection(peers):
    spec = SPECS[0]
    before = peers.call("blocks", spec.key, list(range(32)))
    agent, _ = local_agent(spec)
    with agent:
        peer = agent.add_peer(peers.meta[spec.key])
        desc = build_layout(spec, 1).descriptor.to_bytes()
        enc = Connection(expect_hello=False)

        # 1. garbage instead of a frame: an ERROR, then the connection is closed
        sock, conn = _raw_client(peers.meta[spec.key])
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 32)
        ev = _events(sock, conn, 1)[0]
        assert isinstance(ev, Error) and ev.code == E_PROTOCOL and "magic" in ev.message
        assert sock.recv(1) == b""
        sock.close()

        # 2. a mismatched layout in HELLO is refused
        sock, conn = _raw_client(peers.meta[spec.key])
        sock.sendall(enc.encode(Hello("rogue", build_layout(Spec("hnd", "bfloat16"), 1)
                                      .descriptor.to_bytes())))
        ev = _events(sock, conn, 1)[0]
        assert isinstance(ev, Error) and ev.code == E_LAYOUT
        sock.close()

        # 3. out-of-range and wrongly sized writes are refused, the connection survives
        sock, conn = _raw_client(peers.meta[spec.key])
        sock.sendall(enc.encode(Hello("rogue", desc)))
        assert isinstance(_events(sock, conn, 1)[0], Hello)
        block = build_layout(spec, 1).block_bytes * 2
        payload = b"\xff" * 2 * block
        for frame in (Write(1, 0, (0,), ((40, 1),), block, True, b"x"),
                      Write(2, 0, (0,), ((0, 1),), block - 2, True, b"y"),
                      Write(3, 0, (0, 0), ((0, 1),), 2 * block, True, b"z")):
            sock.sendall(b"".join(bytes(b) for b in enc.send(frame, [payload[:frame.payload_len]])))
        sock.sendall(enc.encode(ReadRequest(4, 0, (0,), ((2**32 - 1, 1),))))
        errors = _events(sock, conn, 4)
        assert [(e.request_id, e.code) for e in errors] == [(1, E_RANGE), (2, E_SIZE),
                                                            (3, E_RANGE), (4, E_RANGE)]

        # 4. a truncated frame, then the socket closes: that connection alone ends
        sock.sendall(enc.encode(ReadRequest(5, 0, (0,), ((1, 1),)))[:-3])
        sock.close()

        agent.read(peer, [1, 2], [1, 2]).wait(10)  # our connection is unaffected
    assert peers.call("blocks", spec.key, list(range(32))) == before
    assert peers.call("notes", spec.key) == []
