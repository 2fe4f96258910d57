"""Backend conformance, trust: with a shared secret only peers that prove they know it
are served, metadata cannot be forged, and bad clients cannot exhaust the server.

Handshake refusals run over every two-sided backend (tcp, ucx, nccl); metadata forgery
over every backend, nixl included (its metadata is the capability). Raw-socket clients
reach only the socket transports (tcp, nccl); ucx runs the same handshake machine
(kvxfer.protocol.handshake) on its serve thread.
"""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest

import kvxfer
from kvxfer import codec as C
from kvxfer.metadata import decode_metadata, encode_metadata, metadata_incarnation
from kvxfer.protocol import E_AUTH, Auth, Connection, Error, Hello, ReadRequest
from kvxfer.protocol.handshake import ClientHandshake

from kvpeer import Spec, block_bytes, build_layout
from kvpeer import local_agent as _local_agent
from rawclient import events, raw_client

SPEC = Spec("nhd", "bfloat16")
SECRET = "kvxfer-conformance-secret-0123456789"
OTHER = "another-deployment-secret-9876543210"


def local_agent(backend: str, name: str = "local", **options):
    return _local_agent(SPEC, 2, name, backend=backend, **options)


def two_sided(backend: str) -> None:
    if backend == "nixl":
        pytest.skip("nixl is one-sided: no handshake; its metadata is the capability")


def retagged(meta: bytes, secret: str | None) -> bytes:
    """The same agent's metadata, tagged with another secret (or none)."""
    info = decode_metadata(meta)
    return encode_metadata(info.name, info.backend, info.address, info.descriptor.to_bytes(),
                           info.backend_metadata, metadata_incarnation(meta),
                           secret.encode() if secret else None)


def prefix_for(backend: str) -> bytes:
    return os.urandom(8).hex().encode() if backend == "nccl" else b""  # nccl's key


def test_peers_with_the_same_secret_move_bytes(backend, peer_process):
    peers = peer_process([SPEC], secret=SECRET)
    agent, layout = local_agent(backend, secret=SECRET)
    with agent:
        peer = agent.add_peer(peers.meta[SPEC.key])
        agent.read(peer, [1, 2], [3, 4]).wait(20)
        agent.write(peer, [5], [6]).wait(20)
    assert block_bytes(layout, [3, 4]) == peers.call("blocks", SPEC.key, [1, 2])
    assert peers.call("blocks", SPEC.key, [6]) == block_bytes(layout, [5])


def test_an_authenticated_connection_agrees_on_a_codec_and_checks_every_chunk(backend,
                                                                              peer_process):
    two_sided(backend)  # the codec offer rides in the same HELLOs as the proofs
    peers = peer_process([SPEC], secret=SECRET, compression="lz4", checksum=True)
    agent, layout = local_agent(backend, secret=SECRET, compression="lz4", checksum=True)
    with agent:
        peer = agent.add_peer(peers.meta[SPEC.key])
        agent.read(peer, [1, 2], [3, 4]).wait(20)
        for region in layout.regions:
            region.view[5].zero_()  # a block that compresses: the codec really runs
        agent.write(peer, [5], [6]).wait(20)
        (conn,) = agent.backend._clients
        assert conn.codec.agreement.checksum and conn.codec.agreement.mode == C.LZ4
        assert conn.codec.compressed_chunks > 0
    assert block_bytes(layout, [3, 4]) == peers.call("blocks", SPEC.key, [1, 2])
    assert peers.call("blocks", SPEC.key, [6]) == block_bytes(layout, [5])


def test_forged_altered_or_untagged_metadata_is_refused_before_it_is_used(backend, peer_process):
    peers = peer_process([SPEC], secret=SECRET)
    meta = peers.meta[SPEC.key]
    agent, _ = local_agent(backend, secret=SECRET)
    with agent:
        info = decode_metadata(meta)
        forged = [meta.replace(info.address.encode(), b"127.0.0.1:1", 1),  # redirected
                  retagged(meta, None),  # no tag
                  retagged(meta, OTHER)]  # tagged by another deployment
        if info.backend_metadata:  # nixl: its memory keys, altered before NIXL sees them
            forged.append(retagged(meta, None)[:-1] + b',"tag":"' + b"0" * 64 + b'"}')
        for bad in forged:
            with pytest.raises(kvxfer.AuthenticationFailed):
                agent.add_peer(bad)
        assert agent.peers == {}
        agent.read(agent.add_peer(meta), [1], [2]).wait(20)  # the real one still works


def test_peers_without_the_secret_or_with_another_are_refused_and_get_no_bytes(
        backend, peer_process):
    two_sided(backend)
    peers = peer_process([SPEC], secret=SECRET)
    meta = peers.meta[SPEC.key]
    before = peers.call("blocks", SPEC.key, list(range(SPEC.num_blocks)))
    stranger, _ = local_agent(backend, "stranger")
    with stranger:
        with pytest.raises(kvxfer.AuthenticationFailed, match="requires authentication"):
            stranger.add_peer(meta)
    impostor, _ = local_agent(backend, "impostor", secret=OTHER)
    with impostor:  # even with metadata that passes its own tag check
        with pytest.raises(kvxfer.AuthenticationFailed, match="failed authentication"):
            impostor.add_peer(retagged(meta, OTHER))
    assert peers.call("blocks", SPEC.key, list(range(SPEC.num_blocks))) == before


def test_a_peer_without_a_secret_cannot_read_from_an_agent_with_one(backend, peer_process):
    two_sided(backend)
    peers = peer_process([SPEC])  # no secret
    server, layout = local_agent(backend, "server", secret=SECRET)
    with server:
        before = block_bytes(layout, list(range(SPEC.num_blocks)))
        answer = peers.call("read_from", SPEC.key, retagged(server.metadata(), None), [0], [1])
        assert answer.startswith("failed") and "requires authentication" in answer
        assert block_bytes(layout, list(range(SPEC.num_blocks))) == before


def _shake_by_hand(sock: socket.socket, conn: Connection, desc: bytes) -> list[bytes]:
    """A valid handshake as a peer with SECRET; returns the bytes it sent."""
    enc = Connection(expect_hello=False)
    hs = ClientHandshake("rogue", desc, SECRET.encode(), lambda _: None, expected=f"peer-{SPEC.key}")
    sent = [enc.encode(hs.hello())]
    sock.sendall(sent[0])
    while not hs.done:
        for frame in hs.on_event(events(sock, conn, 1)[0]):
            sent.append(enc.encode(frame))
            sock.sendall(sent[-1])
    return sent


def test_raw_clients_without_a_valid_proof_get_no_kv(backend, peer_process):
    if backend not in ("tcp", "nccl"):
        pytest.skip("raw sockets reach only the socket transports (tcp, nccl)")
    peers = peer_process([SPEC], secret=SECRET)
    meta = peers.meta[SPEC.key]
    desc = build_layout(SPEC, 1).descriptor.to_bytes()
    enc = Connection(expect_hello=False)
    read = enc.encode(ReadRequest(1, 0, (0,), ((0, 4),)))

    # 1. no proof at all, a READ right behind the HELLO: refused, closed, no DATA
    sock, conn = raw_client(meta, prefix_for(backend))
    sock.sendall(enc.encode(Hello("rogue", desc)) + read)
    err, end = events(sock, conn, 2)
    assert isinstance(err, Error) and err.code == E_AUTH and end == "EOF"
    sock.close()

    # 2. a nonce, then a made-up proof and a READ: refused, closed, no DATA
    sock, conn = raw_client(meta, prefix_for(backend))
    sock.sendall(enc.encode(Hello("rogue", desc, nonce=os.urandom(32))))
    hello = events(sock, conn, 1)[0]
    assert isinstance(hello, Hello) and len(hello.proof) == 32
    sock.sendall(enc.encode(Auth(os.urandom(32))) + read)
    err, end = events(sock, conn, 2)
    assert isinstance(err, Error) and err.code == E_AUTH and end == "EOF"
    sock.close()

    # 3. a recorded valid handshake, replayed byte for byte on a new connection: refused
    sock, conn = raw_client(meta, prefix_for(backend))
    recorded = _shake_by_hand(sock, conn, desc)
    sock.close()
    sock, conn = raw_client(meta, prefix_for(backend))
    sock.sendall(recorded[0])
    assert isinstance(events(sock, conn, 1)[0], Hello)  # a fresh nonce: the old proof is stale
    sock.sendall(recorded[1] + read)
    err, end = events(sock, conn, 2)
    assert isinstance(err, Error) and err.code == E_AUTH and end == "EOF"
    sock.close()


def _status(pid: int) -> tuple[int, int]:
    """(threads, RSS in KiB) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def test_ten_thousand_idle_or_slow_connections_leave_threads_and_rss_flat(
        backend, peer_process):
    if backend not in ("tcp", "nccl"):
        pytest.skip("the handshake loop serves the socket transports (tcp, nccl); ucx "
                    "bounds its serve threads by max_connections")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 10_000 + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    peers = peer_process([SPEC], secret=SECRET)
    meta = peers.meta[SPEC.key]
    pid = peers.proc.pid
    agent, layout = local_agent(backend, secret=SECRET)
    with agent:
        agent.read(agent.add_peer(meta), [0], [1]).wait(20)  # warm: its threads exist
        threads0, rss0 = _status(pid)
        address = decode_metadata(meta).address.rsplit(":", 1)
        target = (address[0], int(address[1]))
        bad: list[socket.socket] = []
        peak_threads, peak_rss = threads0, rss0
        served = []
        try:
            for i in range(10_000):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(target)
                bad.append(s)
                if i % 3 == 0:  # a slow one: half a header, then nothing
                    try:
                        s.send(b"KVXF\x04")
                    except OSError:
                        pass
                if i % 1000 == 999:
                    threads, rss = _status(pid)
                    peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)
                    # a legitimate peer is still served, within its deadline
                    other, _ = local_agent(backend, f"legit-{i}", secret=SECRET)
                    with other:
                        t = time.monotonic()
                        other.read(other.add_peer(meta), [2], [3]).wait(10)
                        served.append(time.monotonic() - t)
        finally:
            threads, rss = _status(pid)
            for s in bad:
                s.close()
    assert len(served) == 10
    peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)
    # each legitimate peer's serve thread goes when it closes; allow a few in flight
    assert peak_threads <= threads0 + 4, (threads0, peak_threads)
    assert peak_rss <= rss0 + (64 << 10), (rss0, peak_rss)  # KiB: within 64 MiB
