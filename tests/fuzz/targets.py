"""Fuzz targets: what a peer's bytes may do to kvxfer's parsers, as plain functions.

Each target takes any bytes and returns normally, or raises the one error kvxfer
promises for bad input (RemoteProtocolError, and for layouts LayoutMismatch, for
metadata AuthenticationFailed). Anything else escaping is a bug: atheris reports it as
a crash (``fuzz_protocol.py``) and the hypothesis tests (``tests/test_fuzz.py``) fail.
Beyond not crashing, every frame decoded from arbitrary bytes must encode back to bytes
that decode to the same frame, and a server handshake must never accept a peer that
did not prove the secret.
"""

from __future__ import annotations

import torch

from kvxfer import KVLayout
from kvxfer.errors import AuthenticationFailed, LayoutMismatch, RemoteProtocolError
from kvxfer.layout import LayoutDescriptor
from kvxfer.metadata import METADATA_MAGIC, decode_metadata
from kvxfer.protocol import NEED_DATA, CLOSED, Connection, PayloadData, decode_note
from kvxfer.protocol import frames as F
from kvxfer.protocol.handshake import ServerHandshake

SECRET = b"fuzzing-secret-0123456789abcdef"
MINE = KVLayout.vllm([torch.zeros(2, 16, 4, 2, 8) for _ in range(2)]).descriptor


def _pieces(data: bytes) -> list[bytes]:
    """Split ``data`` where its own bytes say: byte 0 picks a step pattern."""
    if not data:
        return [b""]
    step = 1 + data[0] % 7
    body = data[1:]
    out, i, k = [], 0, 0
    while i < len(body):
        n = 1 + (body[i] * step + k) % 97 if step > 1 else len(body)
        out.append(body[i:i + n])
        i, k = i + n, k + 1
    return out or [b""]


def _events(conn: Connection, data: bytes, max_events: int = 10_000) -> list:
    """Feed ``data`` in pieces, collecting every frame (stops at an error or EOF)."""
    got: list = []
    for piece in _pieces(data) + [b""]:
        conn.receive_data(piece)
        while len(got) < max_events:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                break
            got.append(ev)
        else:
            break
        if ev is CLOSED:
            break
    return got


def frames(data: bytes) -> None:
    """Any bytes, split anywhere: frames and payload pieces, or a RemoteProtocolError;
    each frame re-encodes to bytes that decode to the same frame."""
    conn = Connection(expect_hello=bool(data[:1]) and data[0] & 0x80 == 0)
    try:
        events = _events(conn, data)
    except RemoteProtocolError:
        assert conn.failed
        return
    enc = Connection(expect_hello=False)
    for ev in events:
        if isinstance(ev, PayloadData):
            continue
        payload_len = getattr(ev, "payload_len", 0)
        again = Connection(expect_hello=False)
        again.receive_data(b"".join(bytes(b) for b in enc.send(ev, [bytes(payload_len)])))
        assert again.next_event() == ev, ev


def handshake(data: bytes) -> None:
    """A server handshake fed any frames never accepts a peer that has no proof."""
    secret = SECRET if data[:1] and data[0] & 1 else None
    shake = ServerHandshake("fuzz", MINE.to_bytes(), secret,
                            lambda raw: MINE.check_compatible(LayoutDescriptor.from_bytes(raw)))
    conn = Connection(expect_hello=True, max_payload=0)
    try:
        for ev in _events(conn, data):
            if shake.finished:
                break
            shake.on_event(ev)
    except (RemoteProtocolError, LayoutMismatch):
        pass
    assert not (secret is not None and shake.done), "accepted a peer without a proof"


def metadata(data: bytes) -> None:
    """Peer metadata: parsed, or RemoteProtocolError / AuthenticationFailed."""
    for secret in (None, SECRET):
        try:
            decode_metadata(data, secret)
        except (RemoteProtocolError, AuthenticationFailed):
            pass
    try:
        decode_metadata(METADATA_MAGIC + data, SECRET)  # past the magic, often
    except (RemoteProtocolError, AuthenticationFailed):
        pass


def notes(data: bytes) -> None:
    try:
        decode_note(data)
    except RemoteProtocolError:
        pass


def seeds() -> list[bytes]:
    """Valid inputs to start from: a stream of every frame type, a handshake, metadata."""
    from kvxfer.metadata import encode_metadata
    from kvxfer.protocol import (Auth, Close, Completion, Data, Error, Hello, Note, ReadRequest,
                                 Write, encode_note)

    enc = Connection(expect_hello=False)
    hello = enc.encode(Hello("peer", MINE.to_bytes(), nonce=b"n" * 32))
    frames_ = [Auth(b"p" * 32), ReadRequest(1, 0, (0, 1), ((0, 2), (5, 1)), heads=(0, 2)),
               Write(2, 0, (1,), ((3, 1),), 0, True, encode_note(Note(1, b"k", (0, 1)))),
               Data(1, 0, 0), Completion(2, 0), Error(1, 0, F.E_RANGE, "x"), Close("bye")]
    stream = hello + b"".join(enc.encode(f) for f in frames_)
    meta = encode_metadata("peer", "tcp", "127.0.0.1:1", MINE.to_bytes(), b"", "inc-1", SECRET)
    return [b"\x01" + stream, b"\x03" + stream, b"\x01" + hello, meta,
            encode_note(Note(2, b"key", message=b"done"))]


TARGETS = {"frames": frames, "handshake": handshake, "metadata": metadata, "notes": notes}


def every(data: bytes) -> None:
    """All targets, the first byte choosing the order (one atheris entry point)."""
    for target in TARGETS.values():
        target(data)
