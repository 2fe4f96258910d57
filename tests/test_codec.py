"""kvxfer.codec: encode/decode, agreement, the auto policy, and the ENC/HELLO fields."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import kvxfer
from kvxfer import codec as C
from kvxfer.errors import ChecksumMismatch, RemoteProtocolError
from kvxfer.protocol import Connection, Data, Encoding, Hello, Write
from kvxfer.protocol import frames as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def real_or_skip(dtype: torch.dtype, nbytes: int) -> np.ndarray:
    try:
        from real_kv import real_kv_bytes
        return real_kv_bytes(dtype, nbytes).numpy()
    except ImportError as exc:
        pytest.skip(f"real KV needs the model package: {exc}")


def kinds(dtype: torch.dtype, n: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(7)
    half = np.zeros(n, dtype=np.uint8)
    half[: n // 2] = gen.integers(0, 256, n // 2, dtype=np.uint8)
    return {"zero": np.zeros(n, dtype=np.uint8),
            "random": gen.integers(0, 256, n, dtype=np.uint8), "half-filled": half}


@pytest.mark.parametrize("codec", [C.LZ4, C.ZSTD], ids=["lz4", "zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_codec_round_trips_every_dtype_byte_exact(codec, dtype):
    elem = dtype.itemsize
    n = 3 * 4096 * elem + 6 * elem  # not a multiple of any block the shuffles use
    for name, raw in kinds(dtype, n).items():
        payload, shuffle = C.encode(memoryview(raw), codec, elem)
        enc = Encoding(codec, shuffle, elem, n, C.checksum(raw))
        assert C.decode(payload, enc).tobytes() == raw.tobytes(), name
        if name == "zero":
            assert len(payload) < n // 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_real_kv_compresses_and_round_trips(dtype):
    raw = real_or_skip(dtype, 1 << 20)
    payload, shuffle = C.encode(memoryview(raw), C.LZ4, dtype.itemsize)
    assert C.decode(payload, Encoding(C.LZ4, shuffle, dtype.itemsize, raw.nbytes)) \
        .tobytes() == raw.tobytes()
    if dtype == torch.bfloat16:  # the exponent bytes of bf16 KV are what compresses
        assert raw.nbytes / len(payload) > 1.1


@pytest.mark.parametrize("codec", [C.LZ4, C.ZSTD], ids=["lz4", "zstd"])
@pytest.mark.parametrize("delta", [-2, 2, 4096])
def test_a_lying_raw_length_is_a_protocol_error(codec, delta):
    raw = np.zeros(8192, dtype=np.uint8)
    payload, shuffle = C.encode(memoryview(raw), codec, 2)
    with pytest.raises(RemoteProtocolError, match="decode|announced|says"):
        C.decode(payload, Encoding(codec, shuffle, 2, raw.nbytes + delta))


@pytest.mark.parametrize("codec", [C.LZ4, C.ZSTD], ids=["lz4", "zstd"])
def test_a_corrupted_compressed_payload_is_a_protocol_error(codec):
    raw = np.arange(8192, dtype=np.uint16).view(np.uint8)
    payload, shuffle = C.encode(memoryview(raw), codec, 2)
    bad = bytearray(payload)
    bad[:32] = b"\xff" * 32
    with pytest.raises(RemoteProtocolError):
        C.decode(bytes(bad), Encoding(codec, shuffle, 2, raw.nbytes))


def test_a_flipped_byte_fails_the_checksum():
    raw = np.arange(4096, dtype=np.uint8)
    enc = Encoding(C.NONE, 0, 1, raw.nbytes, C.checksum(raw))
    bad = raw.copy()
    bad[100] ^= 1
    with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
        C.decode(bad, enc)


def test_agreement_initiator_first_and_a_missing_codec_goes_uncompressed():
    both = (C.NONE, C.LZ4, C.ZSTD)
    a = C.agree(C.Offer(C.LZ4, False, both), C.Offer(C.NONE, True, both))
    assert (a.mode, a.codec, a.checksum, a.note) == (C.LZ4, C.LZ4, True, "")
    a = C.agree(C.Offer(C.NONE, False, both), C.Offer(C.ZSTD, False, both))
    assert (a.mode, a.codec) == (C.ZSTD, C.ZSTD)
    a = C.agree(C.Offer(C.LZ4, False, both), C.Offer(C.NONE, False, (C.NONE,)))
    assert (a.mode, a.codec, a.active) == (C.NONE, C.NONE, False)
    assert "cannot decode" in a.note
    a = C.agree(C.Offer(C.AUTO, False, both), C.Offer(C.NONE, False, (C.NONE, C.ZSTD)))
    assert (a.mode, a.codec, a.ladder) == (C.AUTO, C.ZSTD, (C.NONE, C.ZSTD))


def test_encoding_and_codec_offer_travel_in_frames():
    conn = Connection(expect_hello=False)
    enc = Encoding(C.LZ4, C.SHUFFLE_BIT, 2, 1000, 0xDEADBEEF12345678)
    hello = Hello("a", b"{}", checksum=True, compression=C.AUTO, codecs=(0, 1, 2))
    data = Data(1, 2, 10, enc)
    write = Write(3, 0, (0,), ((1, 2),), 10, enc=Encoding(C.NONE, 0, 1, 10, 5))
    wire = b"".join(b"".join(conn.send(f, [b"x" * 10] if f is not hello else []))
                    for f in (hello, data, write))
    rx = Connection(expect_hello=True)
    rx.receive_data(wire)
    got = []
    while len(got) < 3:
        ev = rx.next_event()
        if isinstance(ev, (Hello, Data, Write)):
            got.append(ev)
    assert got == [hello, data, write]


@pytest.mark.parametrize("enc,match", [
    (Encoding(7, 0, 2, 10), "unknown payload encoding"),
    (Encoding(C.NONE, 0, 1, 11, 1), "uncompressed"),
    (Encoding(C.LZ4, 2, 2, F.MAX_PAYLOAD + 1), "limit"),
])
def test_bad_encodings_are_refused_when_decoded(enc, match):
    raw = F.HEADER.pack(F.MAGIC, F.VERSION, F.T_DATA, 0, 12 + 20, 10) \
        + F._REQ.pack(1, 0) + F._ENC.pack(enc.codec, enc.shuffle, enc.elem,
                                           enc.checksum is not None, enc.raw_len,
                                           enc.checksum or 0)
    rx = Connection(expect_hello=False)
    rx.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=match):
        rx.next_event()


def test_compression_is_refused_on_a_one_sided_backend_naming_the_two_sided_ones():
    with pytest.raises(ValueError, match="tcp, ucx, nccl"):
        kvxfer.Agent("x", backend="nixl", compression="lz4")
    with pytest.raises(ValueError, match="one of"):
        kvxfer.Agent("x", compression="snappy")


def _run(policy: C.AutoPolicy, rates: dict[int, float], n: int,
         chunk: int = 4 << 20, encode: float = 2e9) -> float:
    """Feed ``n`` chunks at fixed rates per codec; returns the mean rate achieved."""
    t = t0 = policy._prev_end  # the clock goes on from the previous run
    for _ in range(n):
        codec = policy.choose()
        dt = chunk / rates[codec]
        policy.record(codec, chunk, chunk // 2 if codec else chunk, t, t + dt,
                      chunk / encode if codec else 0.0)
        t += dt
    return n * chunk / (t - t0)


LADDER = (C.NONE, C.LZ4, C.ZSTD)


@pytest.mark.parametrize("rates", [
    {C.NONE: 119e6, C.LZ4: 148e6, C.ZSTD: 170e6},  # 1 Gbit/s, measured
    {C.NONE: 1197e6, C.LZ4: 859e6, C.ZSTD: 317e6},  # 10 Gbit/s, measured
    {C.NONE: 119e6, C.LZ4: 160e6, C.ZSTD: 100e6},
    {C.NONE: 1e9, C.LZ4: 1e9, C.ZSTD: 1e9},
], ids=["1gbit", "10gbit", "lz4-best", "even"])
def test_auto_costs_under_five_percent_against_the_best_setting(rates):
    policy = C.AutoPolicy(LADDER)
    achieved = _run(policy, rates, 128)  # a 512 MiB read in 4 MiB chunks
    assert achieved >= 0.95 * max(rates.values())


def test_auto_follows_a_link_that_changes():
    policy = C.AutoPolicy(LADDER)
    _run(policy, {C.NONE: 119e6, C.LZ4: 148e6, C.ZSTD: 170e6}, 100)
    assert policy.choose() == C.ZSTD
    _run(policy, {C.NONE: 1197e6, C.LZ4: 859e6, C.ZSTD: 317e6}, 300)  # a faster link
    assert policy.choose() == C.NONE
