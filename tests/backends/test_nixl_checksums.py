"""nixl checksums (kvxfer/backends/nixl_checksums.py): real NIXL agents, real corruption.

Reads are verified before they are placed: a corrupted landing buffer, or owner blocks
that changed under the read, fail the read with the destination untouched; an owner
that does not answer fails it at its deadline. Writes are checked by the receiver after
they landed: a corrupted chunk fails the stream's incoming().
"""

from __future__ import annotations

import dataclasses

import logging
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from kvpeer import (PeerProcess, Spec, block_bytes, build_layout, layer_block_bytes,  # noqa: E402
                    local_agent, snapshot, usable_backend)

import kvxfer  # noqa: E402
from kvxfer.errors import ChecksumMismatch, RemoteProtocolError  # noqa: E402
from kvxfer.memory import RegisteredMemory  # noqa: E402
from kvxfer.protocol.frames import (E_PROTOCOL, E_RANGE, Completion, Data, Error,  # noqa: E402
                                    ReadRequest, encode_detached)

SPEC = Spec("nhd", "bfloat16", num_blocks=32)
TP_SPEC = Spec("hnd", "bfloat16", num_blocks=32, heads=4, tp_rank=1, tp_size=2)
WHOLE4 = Spec("hnd", "bfloat16", num_blocks=32, heads=4)
ALL = list(range(SPEC.num_blocks))


@pytest.fixture(autouse=True)
def _nixl() -> None:
    usable_backend("nixl")


def causes(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or getattr(exc, "cause", None)
    return chain


def until(cond, timeout: float = 10.0) -> bool:
    limit = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > limit:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def pair(request):
    """(owner, owner layout, reader, reader layout, peer); ``request.param``: which side
    has checksum=True ("reader" or "owner")."""
    asks = getattr(request, "param", "reader")
    owner, src = local_agent(SPEC, seed=1, name="owner", backend="nixl",
                             checksum=asks == "owner")
    reader, dst = local_agent(SPEC, seed=2, name="reader", backend="nixl",
                              checksum=asks == "reader", chunk_bytes=1024)  # many chunks
    try:
        yield owner, src, reader, dst, reader.add_peer(owner.metadata())
    finally:
        reader.close()
        owner.close()


@pytest.mark.parametrize("pair", ["reader", "owner"], indirect=True)
def test_checksummed_reads_and_writes_are_byte_exact(pair):
    owner, src, reader, dst, peer = pair
    remote, local = [31, 2, 3, 4, 17, 9, 10, 0], [5, 6, 7, 8, 20, 21, 22, 30]
    h = reader.read(peer, remote, local)
    h.wait(20)
    assert len(h.chunks) > 1  # several chunks, each verified
    assert block_bytes(dst, local) == block_bytes(src, remote)
    # Either side asking turns them on; every chunk went through the owner's answer.
    assert reader.backend.verified_chunks == len(h.chunks)
    w = reader.write(peer, [1, 11, 12], [25, 26, 27])
    w.wait(20)
    assert block_bytes(src, [25, 26, 27]) == block_bytes(dst, [1, 11, 12])
    assert until(lambda: owner.backend.checked_writes == len(w.chunks))
    assert owner.backend.corrupt_writes == 0


@pytest.mark.parametrize("over_read", [False, True], ids=["per-piece", "over-read"])
@pytest.mark.parametrize("kv_layout", ["hnd", "nhd"])
def test_a_reader_of_another_tp_shard_verifies_the_heads_it_reads(kv_layout, over_read,
                                                                  monkeypatch):
    """A read of the shared heads lands them piece by piece, or (small pieces) lands
    the owner's whole blocks: the sums asked for must cover what landed."""
    from kvxfer.backends import nixl_descriptors

    monkeypatch.setattr(nixl_descriptors, "OVERREAD_EXTRA", 1 << 30 if over_read else 0)
    whole, shard = (dataclasses.replace(WHOLE4, ctor=kv_layout),
                    dataclasses.replace(TP_SPEC, ctor=kv_layout))
    owner, src = local_agent(whole, seed=1, name="owner", backend="nixl")
    reader, dst = local_agent(shard, seed=2, name="reader", backend="nixl", checksum=True)
    try:
        peer = reader.add_peer(owner.metadata())
        assert (reader.backend._peers[0].read_dlist is not None) == over_read
        reader.read(peer, [3, 4, 30], [0, 1, 2]).wait(20)
        # Our shard of the owner's model (seed 1) is what must have landed.
        assert block_bytes(dst, [0, 1, 2]) == block_bytes(build_layout(shard, 1), [3, 4, 30])
        assert reader.backend.verified_chunks >= 1
    finally:
        reader.close()
        owner.close()


def _flip(t: torch.Tensor, at: int = 0) -> None:
    t[at] = t[at] ^ 0x01


def test_a_corrupted_landing_fails_the_read_and_places_nothing(pair):
    owner, src, reader, dst, peer = pair
    before = {layer: layer_block_bytes(dst, layer, ALL) for layer in range(SPEC.layers)}
    hits = []

    def corrupt(chunk, landing: torch.Tensor) -> None:
        if not hits:  # the first chunk to land: one bit of it
            hits.append(chunk)
            _flip(landing, 7)

    reader.backend.landed_hook = corrupt
    h = reader.read(peer, list(range(8)), list(range(16, 24)))
    with pytest.raises(kvxfer.TransferFailed, match="checksum mismatch") as info:
        h.wait(20)
    assert hits and any(isinstance(e, ChecksumMismatch) for e in causes(info.value))
    (bad,) = hits
    ids = [lo + i for lo, _, n in bad.runs for i in range(n)]
    for layer in range(SPEC.layers):
        after = layer_block_bytes(dst, layer, ALL)
        if layer in bad.layers:  # the corrupt chunk's blocks: untouched
            assert layer_block_bytes(dst, layer, ids) == [
                b"".join(r[i * len(r) // SPEC.num_blocks:(i + 1) * len(r) // SPEC.num_blocks]
                         for i in ids) for r in before[layer]]
        outside = [b for b in ALL if not 16 <= b < 24]  # canaries: untouched
        assert [b"".join(r[i * len(r) // SPEC.num_blocks:(i + 1) * len(r) // SPEC.num_blocks]
                         for i in outside) for r in after] == \
            [b"".join(r[i * len(r) // SPEC.num_blocks:(i + 1) * len(r) // SPEC.num_blocks]
                      for i in outside) for r in before[layer]]
    assert until(lambda: reader.backend._landings.in_use == 0)  # its buffers went back
    reader.backend.landed_hook = None
    reader.read(peer, list(range(8)), list(range(16, 24))).wait(20)
    assert block_bytes(dst, list(range(16, 24))) == block_bytes(src, list(range(8)))


def test_owner_blocks_changed_under_the_read_are_caught(pair):
    owner, src, reader, dst, peer = pair
    before = snapshot(dst)

    def change_source(chunk, landing) -> None:  # the engine reused block 3 meanwhile
        if 0 in chunk.layers:  # once (a second flip would undo it)
            src.regions[0].view[3].view(torch.uint8).view(-1)[0] ^= 0xFF

    reader.backend.landed_hook = change_source
    h = reader.read(peer, [3], [12])
    with pytest.raises(kvxfer.TransferFailed) as info:
        h.wait(20)
    assert any(isinstance(e, ChecksumMismatch) for e in causes(info.value))
    assert "changed under the read" in str(info.value)
    assert snapshot(dst) == before


def test_an_owner_that_does_not_answer_fails_the_read_at_its_deadline():
    p = PeerProcess([SPEC], seed=1, backend="nixl")
    agent, dst = local_agent(SPEC, seed=2, backend="nixl", checksum=True)
    try:
        peer = agent.add_peer(p.meta[SPEC.key])
        before = snapshot(dst)
        agent.backend.landed_hook = lambda chunk, landing: p.pause()  # landed; now silent
        t0 = time.monotonic()
        h = agent.read(peer, [1, 2], [3, 4], timeout=1.0)
        with pytest.raises(kvxfer.TransferTimeout):
            h.wait(10)
        assert time.monotonic() - t0 < 5  # its deadline, not a hang
        assert snapshot(dst) == before
        assert agent.backend._landings.in_use == 0
        agent.backend.landed_hook = None
        p.resume()
        agent.read(peer, [1, 2], [3, 4]).wait(20)  # answers again once it runs
        assert block_bytes(dst, [3, 4]) == p.call("blocks", SPEC.key, [1, 2])
    finally:
        p.resume()
        agent.close()
        p.stop()


def test_an_owner_that_never_acknowledges_is_refused_at_add_peer(monkeypatch):
    owner, _ = local_agent(SPEC, seed=1, name="owner", backend="nixl")
    # An owner of an older kvxfer: it drops every checksum notification.
    monkeypatch.setattr(owner.backend, "_on_checksum_note", lambda *a: None)
    reader, _ = local_agent(SPEC, seed=2, name="reader", backend="nixl", checksum=True,
                            connect_timeout=1.0)
    try:
        with pytest.raises(kvxfer.PeerUnreachable, match="did not acknowledge"):
            reader.add_peer(owner.metadata())
        assert not [p for p in reader.backend._peers if p.alive]
    finally:
        reader.close()
        owner.close()


def test_a_write_stream_corrupted_after_landing_fails_incoming(pair, caplog):
    owner, src, reader, dst, peer = pair
    seen = []

    def corrupt_landed(frame) -> None:  # the receiver's copy goes bad before its check
        if not seen:
            seen.append(frame)
            block = frame.runs[0][0]
            src.regions[2 * frame.layers[0]].view[block].view(torch.uint8).view(-1)[5] ^= 0x10

    owner.backend.sum_hook = corrupt_landed
    s = reader.write_stream(peer, [1, 2], [20, 21], b"req-7")
    for layer in range(SPEC.layers):
        s.layer_ready(layer)
    s.finish(b"done")
    s.handle.wait(20)  # the writer is not told: one-sided
    inc = owner.incoming(b"req-7", "reader")
    with caplog.at_level(logging.ERROR, logger="kvxfer.nixl"):
        with pytest.raises(kvxfer.TransferFailed, match="checksum mismatch") as info:
            inc.wait(10)
    assert any(isinstance(e, ChecksumMismatch) for e in causes(info.value))
    assert owner.backend.corrupt_writes == 1
    # A plain write whose chunk goes bad is reported too (logged and counted).
    seen.clear()
    with caplog.at_level(logging.ERROR, logger="kvxfer.nixl"):
        reader.write(peer, [3], [22]).wait(20)
        assert until(lambda: owner.backend.corrupt_writes == 2)
    assert "write #" in caplog.text and "checksum mismatch" in caplog.text


# ------------------------------------------------------------ owner's answers
@pytest.fixture
def memory():
    return RegisteredMemory(build_layout(SPEC, 1))


def test_hash_requests_are_bounded_like_reads(memory):
    from kvxfer.backends.nixl_checksums import answer, blocks_checksum

    ok = answer(memory, encode_detached(ReadRequest(5, 1, (0, 2), ((3, 2), (9, 1)))))
    assert isinstance(ok, Data) and (ok.request_id, ok.chunk) == (5, 1)
    assert ok.enc.checksum == blocks_checksum(memory, (0, 2), ((3, 2), (9, 1)), None)
    assert ok.enc.raw_len == ok.payload_len == 3 * 2 * memory.block_bytes * 2
    for bad in [ReadRequest(1, 0, (0,), ((30, 5),)),  # past the registered blocks
                ReadRequest(1, 0, (0,), ((3, 2), (4, 1))),  # block 4 twice
                ReadRequest(1, 0, (SPEC.layers,), ((0, 1),)),  # no such layer
                ReadRequest(1, 0, (0,), ((0, 1),), heads=(0, 9))]:  # no such heads
        refused = answer(memory, encode_detached(bad))
        assert isinstance(refused, Error) and refused.code == E_RANGE, bad
    for junk in [b"garbage", encode_detached(Completion(1, 2))]:
        refused = answer(memory, junk)
        assert isinstance(refused, Error) and refused.code == E_PROTOCOL


def test_the_sum_covers_bytes_in_wire_order(memory):
    from kvxfer.backends.nixl_checksums import blocks_checksum, tensor_checksum

    packed = torch.empty(2 * 2 * memory.block_bytes * 1, dtype=torch.uint8)
    memory.pack_into((1,), ((4, 1), (2, 1)), packed)
    assert blocks_checksum(memory, (1,), ((4, 1), (2, 1)), None) == tensor_checksum(packed)
    assert blocks_checksum(memory, (1,), ((2, 1), (4, 1)), None) != tensor_checksum(packed)
    with pytest.raises(RemoteProtocolError):
        from kvxfer.protocol.frames import decode_detached
        decode_detached(encode_detached(ReadRequest(1, 0, (0,), ((0, 1),)))[:-1])


def test_compression_is_still_refused_on_nixl_and_checksums_are_accepted():
    with pytest.raises(ValueError, match="tcp, ucx, nccl"):
        kvxfer.Agent("x", backend="nixl", compression="lz4")
    with kvxfer.Agent("y", backend="nixl", checksum=True) as agent:
        assert agent.config.checksum


def test_an_introduction_is_tagged_with_the_shared_secret():
    from kvxfer.backends.nixl_checksums import decode_intro, encode_intro

    secret = b"s" * 32
    raw = encode_intro(b"nixl-md", secret)
    assert decode_intro(raw, secret, "r") == b"nixl-md"
    assert decode_intro(encode_intro(b"nixl-md", None), None, "r") == b"nixl-md"
    with pytest.raises(kvxfer.AuthenticationFailed):
        decode_intro(raw, b"t" * 32, "r")  # another deployment's
    with pytest.raises(kvxfer.AuthenticationFailed):
        decode_intro(encode_intro(b"nixl-md", None), secret, "r")  # untagged
    with pytest.raises(RemoteProtocolError):
        decode_intro(raw[:9], secret, "r")


def test_checksummed_reads_work_between_agents_sharing_a_secret():
    secret = b"k" * 32
    owner, src = local_agent(SPEC, seed=1, name="owner", backend="nixl", secret=secret)
    reader, dst = local_agent(SPEC, seed=2, name="reader", backend="nixl", secret=secret,
                              checksum=True)
    try:
        reader.read(reader.add_peer(owner.metadata()), [6, 7], [1, 2]).wait(20)
        assert block_bytes(dst, [1, 2]) == block_bytes(src, [6, 7])
        assert reader.backend.verified_chunks >= 1
    finally:
        reader.close()
        owner.close()
