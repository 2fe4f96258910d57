"""The codec over every two-sided backend: byte-exact round trips, faults, handshakes.

Round trips move zero, random and real-KV blocks (MiniLM-L6's K/V, benchmarks/real_kv.py)
through every codec and layout constructor, both ways (a write encoded by us, a read
encoded by the peer). Faults go through a relay process (tests/integration/relay.py)
that alters bytes in flight; a bad payload fails its transfer with a clear error, leaves
the destination as it was, and the connection serves the next transfer.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch

import kvxfer
from kvxfer import codec as C
from kvxfer.errors import ChecksumMismatch, RemoteError, RemoteProtocolError

from kvpeer import DTYPES, PeerProcess, Spec, block_bytes, build_layout, snapshot
from relay import Relay

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

N = 64
SPECS = [Spec(c, d, num_blocks=N) for c in ("nhd", "hnd", "flashinfer", "split", "mla")
         for d in DTYPES]
CODECS = ["none", "lz4", "zstd", "auto"]


@pytest.fixture(scope="module")
def two_sided(backend):
    if backend == "nixl":
        pytest.skip("nixl is one-sided: no codec on its data path")
    return backend


@pytest.fixture(scope="module")
def peers(two_sided):
    p = PeerProcess(SPECS, backend=two_sided)
    yield p
    p.stop()


def _real_bytes(dtype: str, nbytes: int) -> bytes:
    try:
        from real_kv import real_kv_bytes
    except ImportError as exc:
        pytest.skip(f"real KV needs the model package: {exc}")
    dt = torch.float8_e4m3fn if dtype == "uint8" else DTYPES[dtype]  # uint8 stands for fp8
    return real_kv_bytes(dt, nbytes).numpy().tobytes()


def fill_mixed(layout: kvxfer.KVLayout, dtype: str) -> None:
    """Blocks 0-9 zero, 10-21 real KV, the rest left random (as built)."""
    size = layout.block_bytes
    real = _real_bytes(dtype, 12 * size * len(layout.regions))
    at = 0
    for r in layout.regions:
        for b in range(22):
            blk = r.view[b]
            if b < 10:
                blk.zero_()
            else:
                src = torch.frombuffer(bytearray(real[at:at + size]), dtype=torch.uint8)
                blk.copy_(src.view(blk.dtype).view(blk.shape))
                at += size


def client(agent: kvxfer.Agent):
    (conn,) = agent.backend._clients
    return conn


@pytest.mark.parametrize("compression", CODECS)
def test_every_codec_round_trips_every_layout_and_dtype(two_sided, peers, compression):
    for spec in SPECS:
        layout = build_layout(spec, seed=2)
        fill_mixed(layout, spec.dtype)
        src = list(range(32))
        remote = list(range(N - 1, N - 33, -1))
        with kvxfer.Agent("local", backend=two_sided, compression=compression,
                          checksum=compression in ("none", "zstd"),
                          chunk_bytes=256 << 10) as agent:
            agent.register_kv_cache(layout)
            peer = agent.add_peer(peers.meta[spec.key])
            agent.write(peer, src, remote).wait(20)
            assert peers.call("blocks", spec.key, remote) == block_bytes(layout, src), spec
            agent.read(peer, remote, list(range(32, 64))).wait(20)
            assert block_bytes(layout, list(range(32, 64))) == block_bytes(layout, src), spec
            codec = client(agent).codec
            if compression in ("lz4", "zstd"):
                assert codec.compressed_chunks > 0, spec  # zero and real blocks compress


def test_a_peer_without_the_codec_agrees_on_none_and_says_so(two_sided, monkeypatch, caplog):
    spec = Spec("nhd", "bfloat16", num_blocks=N)
    src, dst = build_layout(spec, 1), build_layout(spec, 2)
    with monkeypatch.context() as m:  # the peer's lz4 and zstd libraries are missing
        m.setattr("kvxfer.backends.twosided.available_codecs", lambda: (C.NONE,))
        old = kvxfer.Agent("old", backend=two_sided)
    with old, kvxfer.Agent("new", backend=two_sided, compression="lz4") as new:
        old.register_kv_cache(src)
        new.register_kv_cache(dst)
        with caplog.at_level(logging.WARNING, logger="kvxfer.twosided"):
            peer = new.add_peer(old.metadata())
        assert "cannot decode it" in caplog.text
        assert client(new).codec.agreement == C.Agreement(C.NONE, C.NONE, False,
                                                          client(new).codec.agreement.note)
        new.read(peer, [1, 2, 3], [4, 5, 6]).wait(20)
        assert block_bytes(dst, [4, 5, 6]) == block_bytes(src, [1, 2, 3])


# ------------------------------------------------------------- relay faults
def via(meta: bytes, port: int) -> bytes:
    """The peer's metadata with its address replaced by the relay's."""
    magic = meta[:meta.index(b"{")]
    body = json.loads(meta[len(magic):])
    body["address"] = f"127.0.0.1:{port}"
    return magic + json.dumps(body, separators=(",", ":")).encode()


@pytest.fixture
def tcp_peer(backend):
    if backend != "tcp":
        pytest.skip("the relay speaks TCP")
    spec = Spec("nhd", "bfloat16", num_blocks=N)
    p = PeerProcess([spec], backend="tcp", prefix="relayed")
    layout = build_layout(spec, 3)
    fill_mixed(layout, "bfloat16")  # give the peer compressible blocks
    with kvxfer.Agent("filler") as a:
        a.register_kv_cache(layout)
        a.write(a.add_peer(p.meta[spec.key]), list(range(22)), list(range(22))).wait(20)
    yield p, spec
    p.stop()


@pytest.mark.parametrize("compression,checksum,mutate,cause", [
    ("none", True, "flip", ChecksumMismatch),
    ("lz4", True, "flip", RemoteProtocolError),  # the decoder or the checksum sees it
    ("lz4", False, "garbage", RemoteProtocolError),
    ("zstd", False, "garbage", RemoteProtocolError),
    ("lz4", False, "rawlen", RemoteProtocolError),
])
def test_a_read_altered_in_flight_fails_and_touches_nothing(tcp_peer, compression, checksum,
                                                            mutate, cause):
    p, spec = tcp_peer
    host, port = json.loads(p.meta[spec.key][p.meta[spec.key].index(b"{"):])["address"] \
        .rsplit(":", 1)
    relay = Relay((host, int(port)), "to_client", mutate,
                  codec=None if compression == "none" else C.MODES[compression])
    layout = build_layout(spec, 4)
    try:
        with kvxfer.Agent("reader", compression=compression, checksum=checksum) as agent:
            agent.register_kv_cache(layout)
            peer = agent.add_peer(via(p.meta[spec.key], relay.port))
            before = snapshot(layout)
            h = agent.read(peer, list(range(22)), list(range(30, 52)))
            with pytest.raises(kvxfer.TransferFailed) as info:
                h.wait(20)
            assert relay.altered == 1
            chain, exc = [], info.value
            while exc is not None:
                chain.append(exc)
                exc = exc.__cause__ or getattr(exc, "cause", None)
            assert any(isinstance(e, cause) for e in chain), chain
            assert snapshot(layout) == before  # no byte of it was placed
            # The stream stayed in step: the connection serves the next read.
            agent.read(peer, list(range(22)), list(range(30, 52))).wait(20)
            assert block_bytes(layout, list(range(30, 52))) == \
                p.call("blocks", spec.key, list(range(22)))
    finally:
        relay.stop()


def test_a_write_altered_in_flight_is_refused_and_touches_nothing(tcp_peer):
    p, spec = tcp_peer
    host, port = json.loads(p.meta[spec.key][p.meta[spec.key].index(b"{"):])["address"] \
        .rsplit(":", 1)
    relay = Relay((host, int(port)), "to_server", "flip")  # raw bytes: the checksum
    layout = build_layout(spec, 5)
    fill_mixed(layout, "bfloat16")
    try:
        with kvxfer.Agent("writer", checksum=True) as agent:
            agent.register_kv_cache(layout)
            peer = agent.add_peer(via(p.meta[spec.key], relay.port))
            before = p.call("blocks", spec.key, list(range(40, 62)))
            with pytest.raises(kvxfer.TransferFailed) as info:
                agent.write(peer, list(range(22)), list(range(40, 62))).wait(20)
            assert isinstance(info.value.cause, RemoteError)
            assert "checksum mismatch" in str(info.value)
            assert p.call("blocks", spec.key, list(range(40, 62))) == before
            agent.write(peer, list(range(22)), list(range(40, 62))).wait(20)
            assert p.call("blocks", spec.key, list(range(40, 62))) == \
                block_bytes(layout, list(range(22)))
    finally:
        relay.stop()
