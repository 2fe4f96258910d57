"""The sans-I/O protocol: round trips, every byte split, and every kind of bad input."""

from __future__ import annotations

import struct

import pytest

from kvxfer.errors import LocalProtocolError, RemoteProtocolError
from kvxfer.protocol import (CLOSED, NEED_DATA, Auth, Close, Completion, Connection, Data, Error,
                             Hello, PayloadData, ReadRequest, Write)
from kvxfer.protocol import frames as F

FRAMES = [
    (Hello("prefill-0", b'{"x":1}'), b""),
    (Auth(b"\x07" * 32), b""),
    (Auth(b""), b""),
    (ReadRequest(7, 3, (0, 5, 31), ((10, 4), (2, 1))), b""),
    (ReadRequest(7, 4, (2,), ((0, 1),), heads=(4, 8)), b""),
    (Write(8, 0, (1,), ((3, 2),), payload_len=6, last=True, notify=b"done"), b"abcdef"),
    (Write(8, 1, (1,), ((5, 1),), payload_len=2, heads=(0, 1)), b"gh"),
    (Write(9, 1, (), (), payload_len=0), b""),
    (Data(7, 3, payload_len=5), b"\x00\x01\x02\x03\x04"),
    (Completion(8, 0), b""),
    (Error(7, 3, F.E_RANGE, "block 99 out of range ✗"), b""),
    (Close("bye"), b""),
]


def stream() -> bytes:
    enc = Connection(expect_hello=False)
    return b"".join(bytes(b) for frame, payload in FRAMES
                    for b in enc.send(frame, [payload] if payload else []))


def decode(chunks: list[bytes], conn: Connection | None = None) -> list:
    conn = conn or Connection()
    out: list = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            if ev is CLOSED:
                out.append(ev)
                return out
            out.append(ev)
    return out


def squash(events: list) -> list:
    """Frames with their payload pieces joined, so any split compares equal."""
    out: list = []
    for ev in events:
        if isinstance(ev, PayloadData):
            frame, data = out[-1]
            out[-1] = (frame, data + ev.data)
        else:
            out.append((ev, b""))
    return out


def test_round_trip_of_every_frame():
    assert squash(decode([stream()])) == FRAMES


def test_every_split_point_decodes_the_same():
    data = stream()
    for cut in range(1, len(data)):
        assert squash(decode([data[:cut], data[cut:]])) == FRAMES, cut


def test_byte_by_byte():
    data = stream()
    assert squash(decode([data[i:i + 1] for i in range(len(data))])) == FRAMES


def test_payload_is_returned_untouched_not_copied():
    payload = bytearray(b"xyz")
    out = Connection().send(Data(1, 0, payload_len=3), [payload])
    assert out[1] is payload


def test_eof_at_a_frame_boundary_is_closed_and_inside_a_frame_is_truncated():
    enc = Connection(expect_hello=False)
    hello = enc.encode(Hello("a", b""))
    assert decode([hello, b""]) [-1] is CLOSED
    for cut in (3, len(F.MAGIC) + 10, len(hello) - 1):
        conn = Connection()
        conn.receive_data(hello[:cut])
        assert conn.next_event() is NEED_DATA
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="truncated"):
            conn.next_event()


def _header(magic=F.MAGIC, version=F.VERSION, ftype=F.T_HELLO, flags=0, body=0, payload=0):
    return F.HEADER.pack(magic, version, ftype, flags, body, payload)


@pytest.mark.parametrize("raw,match", [
    (_header(magic=b"HTTP"), "bad magic"),
    (_header(version=9), "unsupported protocol version 9"),
    (_header(ftype=42), "unknown frame type 42"),
    (_header(ftype=F.T_READ, payload=5), "cannot carry a payload"),
    (_header(body=1 << 30), "exceeds the limit"),
    (_header(ftype=F.T_WRITE, body=10, payload=1 << 40), "exceeds the limit"),
])
def test_bad_headers_are_remote_protocol_errors(raw, match):
    conn = Connection(expect_hello=False)
    conn.receive_data(raw + b"\0" * 64)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()


def _frame(ftype: int, body: bytes, payload: int = 0, flags: int = 0) -> bytes:
    return _header(ftype=ftype, body=len(body), payload=payload, flags=flags) + body


@pytest.mark.parametrize("raw,match", [
    (_frame(F.T_READ, struct.pack("!QIHHHI", 1, 0, 0, 0, 3, 0) + b"\0\0"), "truncated"),
    (_frame(F.T_READ, struct.pack("!QIHHHI", 1, 0, 0, 0, 0, 1) + struct.pack("!II", 5, 0)),
     "empty run"),
    (_frame(F.T_READ, struct.pack("!QIHHHI", 1, 0, 4, 4, 1, 1) + struct.pack("!HII", 0, 0, 1)),
     "empty head range"),
    (_frame(F.T_COMPLETION, struct.pack("!QI", 1, 0) + b"extra"), "stray bytes"),
    (_frame(F.T_ERROR, struct.pack("!QIHH", 1, 0, 1, 2) + b"\xff\xfe"), "not utf-8"),
    (_frame(F.T_HELLO, struct.pack("!H", 5000) + b"a" * 5000 + b"\0\0\0\0"), "exceeds"),
])
def test_garbled_bodies_are_remote_protocol_errors(raw, match):
    conn = Connection(expect_hello=False)
    conn.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()


def test_hello_must_come_first_and_only_once():
    enc = Connection(expect_hello=False)
    conn = Connection()
    conn.receive_data(enc.encode(Completion(1, 0)))
    with pytest.raises(RemoteProtocolError, match="HELLO first"):
        conn.next_event()
    conn = Connection()
    conn.receive_data(enc.encode(Hello("a", b"")) + enc.encode(Hello("a", b"")))
    assert isinstance(conn.next_event(), Hello)
    with pytest.raises(RemoteProtocolError, match="twice"):
        conn.next_event()


def test_a_failed_connection_refuses_every_further_call():
    conn = Connection()
    conn.receive_data(_header(magic=b"NOPE"))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.failed
    for call in (conn.next_event, lambda: conn.receive_data(b"x"),
                 lambda: conn.send(Close()), lambda: conn.take_payload(1)):
        with pytest.raises(LocalProtocolError, match="already failed"):
            call()


def test_local_misuse_is_a_local_protocol_error():
    conn = Connection()
    with pytest.raises(LocalProtocolError, match="payload_len=4 but 2"):
        conn.send(Write(1, 0, (0,), ((0, 1),), payload_len=4), [b"ab"])
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        conn.send(ReadRequest(-1, 0, (0,), ((0, 1),)))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        conn.send(ReadRequest(1, 0, (70000,), ((0, 1),)))


def test_payload_taken_in_place_then_from_the_transport():
    enc = Connection(expect_hello=False)
    head = enc.send(Data(1, 0, payload_len=10), [b"0123456789"])
    conn = Connection(expect_hello=False)
    conn.receive_data(bytes(head[0]) + b"0123")
    assert isinstance(conn.next_event(), Data)
    dest = bytearray(10)
    assert conn.take_payload_into(memoryview(dest)) == 4
    with pytest.raises(LocalProtocolError):
        conn.payload_received_elsewhere(7)
    dest[4:] = b"456789"  # as if recv_into had filled it
    conn.payload_received_elsewhere(6)
    assert conn.payload_remaining == 0 and bytes(dest) == b"0123456789"
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("note", [
    F.Note(F.NOTE_USER, message=b"done: req-7"),
    F.Note(F.NOTE_USER),
    F.Note(F.NOTE_LAYERS, b"req-42", (0, 31, 5)),
    F.Note(F.NOTE_FINISHED, b"req-42", message=b"bye"),
    F.Note(F.NOTE_FINISHED, b"k" * F.MAX_KEY),
])
def test_notes_round_trip(note):
    assert F.decode_note(F.encode_note(note)) == note


@pytest.mark.parametrize("raw, match", [
    (b"", "truncated"),
    (b"\x09abc", "unknown note kind 9"),
    (b"\x01\x00\x05abc", "truncated"),
    (b"\x01\x00\x01k\x00\x02\x00\x01", "truncated"),
    (b"\x01\x00\x01k\x00\x01\x00\x01zz", "stray bytes"),
    (b"\x02" + struct.pack("!H", F.MAX_KEY + 1) + b"k" * (F.MAX_KEY + 1), "exceeds"),
])
def test_malformed_notes_are_remote_protocol_errors(raw, match):
    with pytest.raises(RemoteProtocolError, match=match):
        F.decode_note(raw)


def test_hello_carries_nonce_and_proof():
    hello = Hello("decode-1", b"{}", nonce=b"n" * 32, proof=b"p" * 32)
    conn = Connection()
    conn.receive_data(Connection(expect_hello=False).encode(hello))
    assert conn.next_event() == hello


def test_a_nonce_too_long_is_refused_both_ways():
    with pytest.raises(LocalProtocolError, match="at most"):
        Connection().encode(Hello("a", b"", nonce=b"n" * (F.MAX_NONCE + 1)))
    body = F._U16.pack(1) + b"a" + F._U32.pack(0) + bytes([F.MAX_NONCE + 1])
    conn = Connection()
    conn.receive_data(F.HEADER.pack(F.MAGIC, F.VERSION, F.T_HELLO, 0, len(body), 0) + body)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        conn.next_event()


def test_a_key_too_long_is_refused_before_it_is_sent():
    with pytest.raises(ValueError, match="at most"):
        F.encode_note(F.Note(F.NOTE_LAYERS, b"k" * (F.MAX_KEY + 1), (0,)))


# 2: no head ranges; 3: HELLO without a nonce; 4: no codecs; 6: a newer release
@pytest.mark.parametrize("old", [1, 2, 3, 4, 6])
def test_a_peer_speaking_another_version_is_refused_naming_both_versions(old):
    assert F.VERSION == 5
    conn = Connection()
    conn.receive_data(_header(version=old))
    with pytest.raises(RemoteProtocolError, match=f"version {old} .*we speak 5"):
        conn.next_event()


def test_a_head_range_that_cannot_go_on_the_wire_is_a_local_error():
    with pytest.raises(LocalProtocolError, match="head range"):
        Connection(expect_hello=False).send(ReadRequest(1, 0, (0,), ((0, 1),), heads=(3, 2)))


def test_detached_frames_round_trip_without_their_payload():
    frames = [F.ReadRequest(7, 2, (0, 3), ((4, 2), (9, 1)), heads=(1, 3)),
              Data(7, 2, 4096, F.Encoding(raw_len=4096, checksum=0xDEADBEEF12345678)),
              F.Write(7, 2, (1,), ((5, 1),), 512, notify=b"\x01k", heads=None,
                      enc=F.Encoding(raw_len=512, checksum=1)),
              Error(7, 2, F.E_RANGE, "no"), Completion(0, 0)]
    for frame in frames:
        raw = F.encode_detached(frame)
        assert F.decode_detached(raw) == frame
        with pytest.raises(RemoteProtocolError):
            F.decode_detached(raw[:-1])
        with pytest.raises(RemoteProtocolError):
            F.decode_detached(raw + b"\0")
    with pytest.raises(RemoteProtocolError, match="no header"):
        F.decode_detached(b"KVXF")
    with pytest.raises(LocalProtocolError):
        F.encode_detached(F.ReadRequest(1, 0, (0,), ((0, 1),), heads=(3, 1 << 20)))
