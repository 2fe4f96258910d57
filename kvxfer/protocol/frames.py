"""Frames of the kvxfer wire protocol and their byte encoding.

Theory of operation
-------------------
Every frame is a fixed 20-byte header, a typed body, and an optional payload::

     0       4   5   6       8           12                      20
    +-------+---+---+-------+-----------+-----------------------+------//------+----//----+
    | magic |ver|typ| flags | body_len  | payload_len           | body         | payload  |
    | KVXF  |u8 |u8 | u16   | u32       | u64                   | body_len B   | payl. B  |
    +-------+---+---+-------+-----------+-----------------------+------//------+----//----+
    all integers big-endian

Bodies (``runs`` are (first block id, block count) pairs on the receiver's side)::

    HELLO       u16 name_len, name, u32 desc_len, descriptor (JSON of LayoutDescriptor),
                u8 nonce_len, nonce, u8 proof_len, proof       (version 4; kvxfer.auth),
                u8 flags (1: checksums wanted), u8 compression wanted (0 none, 1 lz4,
                2 zstd, 3 auto), u8 n, n*u8 codecs this agent can decode   (version 5)
    AUTH        u8 proof_len, proof      (the connecting side's proof; empty from the
                                          serving side: the proof was accepted)
    READ        u64 request, u32 chunk, u16 h0, u16 h1, u16 n_layers, u32 n_runs,
                n_layers*u16, n_runs*(u32,u32)
    WRITE       as READ, then u32 notify_len, notify, ENC (payload: the chunk's bytes)
                (no runs, notify set: a message for the receiving agent, a note below)
    DATA        u64 request, u32 chunk, ENC              (payload: the chunk's bytes)
    ENC         u8 codec, u8 shuffle, u8 elem, u8 has_sum, u64 raw_len, u64 xxh3
                (version 5) how the payload is encoded (kvxfer.codec): codec 0 (none)
                carries the raw bytes (raw_len == payload_len); 1 (lz4), 2 (zstd)
                decompress to exactly raw_len bytes, or the frame is refused; has_sum:
                xxh3 is the xxh3-64 of the raw bytes, checked before they are placed
    COMPLETION  u64 request, u32 chunk
    ERROR       u64 request, u32 chunk, u16 code, u16 msg_len, msg (utf-8)
    CLOSE       u16 reason_len, reason

``h0, h1`` (version 3) are the KV heads ``[h0, h1)`` of the receiver's own heads that
the chunk moves, for peers of other tensor-parallel sizes; ``0, 0``: whole blocks. A
head-sliced chunk carries, per block, only the pieces holding those heads
(:func:`kvxfer.heads.block_segments`), in the packing module's order.

With a shared secret (version 4), the connecting side's HELLO carries a fresh nonce,
the serving side answers with its own nonce and an HMAC proof over both names, both
descriptors and both nonces, the connecting side checks it and sends its own proof in
AUTH, and the serving side accepts with an empty AUTH (or refuses with E_AUTH). Without a
secret both nonce and proof are empty and the HELLO exchange is all.

A WRITE's notify is a note for the receiving agent, delivered once the chunks before it
on the connection have landed (version 2; version 1 carried the user's bytes bare)::

    NOTE_USER      u8 0, user bytes                      a write's notify
    NOTE_LAYERS    u8 1, u16 key_len, key, u16 n, n*u16   these layers of stream `key`
                                                         have landed
    NOTE_FINISHED  u8 2, u16 key_len, key, user bytes    stream `key` is complete; its
                                                         notify (may be empty)

A detached frame is a header and body whose payload moved another way (NIXL: one-sided);
``payload_len`` still says how many bytes it describes. The nixl backend sends these in
its notifications (:mod:`kvxfer.backends.nixl_checksums`): READ asks the owner of blocks
for their checksum, DATA (its ENC has_sum set) or ERROR answers, WRITE tells a receiver
what a write's chunk should hold.

A chunk's payload is, in this order: for each layer listed, for each part (K, V or the
MLA latent), for each run, the run's blocks. The packing module draws the same order.

Decoding checks structure only (magic, version, type, sizes, body consistency). Whether
block ids fit the registered KV cache is checked by the receiver's memory map before a
payload byte is placed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

from ..errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"KVXF"
VERSION = 5  # 2: a WRITE's notify is a typed note (encode_note); 3: head ranges in READ/WRITE;
#             4: HELLO carries a nonce and a proof, AUTH (shared-secret authentication);
#             5: codecs and checksums (HELLO offers, ENC on DATA and WRITE)
HEADER = struct.Struct("!4sBBHIQ")
HEADER_SIZE = HEADER.size  # 20

T_HELLO, T_READ, T_WRITE, T_DATA, T_COMPLETION, T_ERROR, T_CLOSE, T_AUTH = range(1, 9)
FLAG_LAST = 0x1  # WRITE: the request's last chunk; its notify is delivered after it lands

# Error codes carried by ERROR frames.
E_PROTOCOL, E_RANGE, E_LAYOUT, E_SIZE, E_INTERNAL, E_CLOSING, E_BACKLOG, E_AUTH, E_CODEC = range(1, 10)
# E_CODEC: a chunk's payload did not decode to its announced length or failed its checksum.
# E_BACKLOG: a write's notify was refused: the receiver's unread notifications are full.
# E_AUTH: the connection was refused: no proof of the shared secret, or a wrong one.

_REQ = struct.Struct("!QI")
_XFER = struct.Struct("!QIHHHI")
_ERR = struct.Struct("!QIHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
MAX_NAME = 1024
MAX_NONCE = 64  # bytes of a HELLO's nonce, and of a proof
MAX_KEY = 1024  # bytes of a stream's request key
NOTE_USER, NOTE_LAYERS, NOTE_FINISHED = range(3)
_U8 = struct.Struct("!B")
_ENC = struct.Struct("!BBBBQQ")
_HELLO_TAIL = struct.Struct("!BBB")
CODECS = (0, 1, 2)  # none, lz4, zstd (kvxfer.codec names them)
MODES = (0, 1, 2, 3)  # none, lz4, zstd, auto
# Largest payload of one frame (one chunk). A receiver refuses a larger frame, or a READ
# that would need a larger answer, before it allocates anything; senders plan chunks
# below it.
MAX_PAYLOAD = 256 << 20


@dataclass(frozen=True, slots=True)
class Hello:
    name: str  # the sending agent's name
    descriptor: bytes  # its LayoutDescriptor, encoded
    version: int = VERSION
    nonce: bytes = b""  # fresh random bytes when the sender authenticates (kvxfer.auth)
    proof: bytes = b""  # the serving side's proof over both HELLOs (kvxfer.auth)
    checksum: bool = False  # the sender wants checksums on this connection
    compression: int = 0  # the compression it wants (MODES)
    codecs: tuple[int, ...] = (0,)  # the codecs it can decode


@dataclass(frozen=True, slots=True)
class Auth:
    proof: bytes  # the connecting side's proof; empty from the serving side: accepted


@dataclass(frozen=True, slots=True)
class Encoding:
    """How a payload is encoded; see ENC in the module docstring."""

    codec: int = 0  # 0 none, 1 lz4, 2 zstd
    shuffle: int = 0  # 0 none, 1 byte, 2 bit
    elem: int = 1  # element size the shuffle used
    raw_len: int = 0  # bytes once decoded
    checksum: int | None = None  # xxh3-64 of the raw bytes


def _enc_body(enc: "Encoding | None", payload_len: int) -> bytes:
    if enc is None:
        return _ENC.pack(0, 0, 1, 0, payload_len, 0)
    if enc.codec == 0 and enc.raw_len != payload_len:
        raise LocalProtocolError(f"an uncompressed payload of {payload_len} bytes "
                                 f"announced as {enc.raw_len}")
    return _ENC.pack(enc.codec, enc.shuffle, enc.elem, enc.checksum is not None, enc.raw_len,
                     enc.checksum or 0)


def _enc_fields(r: "_Reader", payload_len: int) -> "Encoding | None":
    codec, shuffle, elem, has_sum, raw_len, xxh = r.unpack(_ENC)
    if codec not in CODECS or shuffle > 2 or elem not in (1, 2, 4, 8) or has_sum > 1:
        raise RemoteProtocolError(f"unknown payload encoding (codec {codec}, shuffle "
                                  f"{shuffle}, element size {elem})")
    if raw_len > MAX_PAYLOAD:
        raise RemoteProtocolError(f"payload announced as {raw_len} raw bytes, more than the "
                                  f"limit of {MAX_PAYLOAD}")
    if codec == 0 and raw_len != payload_len:
        raise RemoteProtocolError(f"uncompressed payload of {payload_len} bytes announced "
                                  f"as {raw_len}")
    if codec == 0 and not has_sum:
        return None
    return Encoding(codec, shuffle, elem, raw_len, xxh if has_sum else None)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    request_id: int
    chunk: int
    layers: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]  # (first block, count) on the server's side
    heads: tuple[int, int] | None = None  # [h0, h1) of the server's heads; None: whole


@dataclass(frozen=True, slots=True)
class Write:
    request_id: int
    chunk: int
    layers: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]  # (first block, count) on the receiver's side
    payload_len: int
    last: bool = False
    notify: bytes = b""
    heads: tuple[int, int] | None = None  # [h0, h1) of the receiver's heads; None: whole
    enc: Encoding | None = None  # None: the raw bytes, no checksum


@dataclass(frozen=True, slots=True)
class Data:
    request_id: int
    chunk: int
    payload_len: int
    enc: Encoding | None = None  # None: the raw bytes, no checksum


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: int
    chunk: int


@dataclass(frozen=True, slots=True)
class Error:
    request_id: int  # 0: the connection itself
    chunk: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Close:
    reason: str = ""


Frame = Union[Hello, Auth, ReadRequest, Write, Data, Completion, Error, Close]


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    type: int
    flags: int
    body_len: int
    payload_len: int = field(default=0)


def _s(text: str, limit: int = 0xFFFF) -> bytes:
    raw = text.encode("utf-8", "replace")[:limit]
    return _U16.pack(len(raw)) + raw


def _short(raw: bytes) -> bytes:
    if len(raw) > MAX_NONCE:
        raise LocalProtocolError(f"a nonce or proof has at most {MAX_NONCE} bytes, "
                                 f"got {len(raw)}")
    return _U8.pack(len(raw)) + raw


def _xfer_body(f: ReadRequest | Write) -> bytes:
    n_layers, n_runs = len(f.layers), len(f.runs)
    flat = [x for run in f.runs for x in run]
    h0, h1 = f.heads if f.heads is not None else (0, 0)
    if f.heads is not None and not 0 <= h0 < h1 <= 0xFFFF:
        raise LocalProtocolError(f"head range {f.heads!r} cannot go on the wire")
    return (_XFER.pack(f.request_id, f.chunk, h0, h1, n_layers, n_runs)
            + struct.pack(f"!{n_layers}H", *f.layers) + struct.pack(f"!{2 * n_runs}I", *flat))


def encode_body(frame: Frame) -> tuple[int, int, bytes, int]:
    """(type, flags, body, payload_len) of a frame."""
    if isinstance(frame, Hello):
        name = frame.name.encode()
        if frame.compression not in MODES or any(c not in CODECS for c in frame.codecs):
            raise ValueError(f"unknown compression {frame.compression} or codecs {frame.codecs}")
        return T_HELLO, 0, (_U16.pack(len(name)) + name + _U32.pack(len(frame.descriptor))
                            + frame.descriptor + _short(frame.nonce) + _short(frame.proof)
                            + _HELLO_TAIL.pack(frame.checksum, frame.compression,
                                               len(frame.codecs))
                            + bytes(frame.codecs)), 0
    if isinstance(frame, Auth):
        return T_AUTH, 0, _short(frame.proof), 0
    if isinstance(frame, ReadRequest):
        return T_READ, 0, _xfer_body(frame), 0
    if isinstance(frame, Write):
        body = (_xfer_body(frame) + _U32.pack(len(frame.notify)) + frame.notify
                + _enc_body(frame.enc, frame.payload_len))
        return T_WRITE, FLAG_LAST if frame.last else 0, body, frame.payload_len
    if isinstance(frame, Data):
        return T_DATA, 0, (_REQ.pack(frame.request_id, frame.chunk)
                           + _enc_body(frame.enc, frame.payload_len)), frame.payload_len
    if isinstance(frame, Completion):
        return T_COMPLETION, 0, _REQ.pack(frame.request_id, frame.chunk), 0
    if isinstance(frame, Error):
        msg = frame.message.encode("utf-8", "replace")[:0xFFFF]
        return T_ERROR, 0, _ERR.pack(frame.request_id, frame.chunk, frame.code, len(msg)) + msg, 0
    if isinstance(frame, Close):
        return T_CLOSE, 0, _s(frame.reason), 0
    raise TypeError(f"not a kvxfer frame: {frame!r}")


def parse_header(raw: bytes | memoryview) -> Header:
    magic, version, ftype, flags, body_len, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad magic {bytes(magic)!r}: not a kvxfer stream")
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version} (we speak {VERSION})")
    if not T_HELLO <= ftype <= T_AUTH:
        raise RemoteProtocolError(f"unknown frame type {ftype}")
    if payload_len and ftype not in (T_WRITE, T_DATA):
        raise RemoteProtocolError(f"frame type {ftype} cannot carry a payload")
    return Header(version, ftype, flags, body_len, payload_len)


def encode_detached(frame: Frame) -> bytes:
    """Header and body of ``frame`` without its payload (see "detached" above).

    Raises:
        LocalProtocolError: the frame cannot be encoded.
    """
    try:
        ftype, flags, body, payload_len = encode_body(frame)
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        raise LocalProtocolError(f"cannot encode {type(frame).__name__}: {exc}") from exc
    return HEADER.pack(MAGIC, VERSION, ftype, flags, len(body), payload_len) + body


def decode_detached(raw: bytes | memoryview) -> Frame:
    """A detached frame: exactly a header and its body, no payload.

    Raises:
        RemoteProtocolError: malformed, or bytes missing or left over.
    """
    view = memoryview(raw)
    if len(view) < HEADER_SIZE:
        raise RemoteProtocolError(f"a detached frame of {len(view)} bytes has no header")
    h = parse_header(view[:HEADER_SIZE])
    if len(view) != HEADER_SIZE + h.body_len:
        raise RemoteProtocolError(f"a detached frame of {len(view)} bytes announces a body of "
                                  f"{h.body_len}")
    return decode_body(h, view[HEADER_SIZE:])


class _Reader:
    """Bounds-checked cursor over one body; any overrun is a RemoteProtocolError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RemoteProtocolError(f"frame body truncated: needs {self.pos + n} bytes, "
                                      f"has {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def text(self, n: int) -> str:
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"text field is not utf-8: {exc}") from exc

    def short(self) -> bytes:
        (n,) = self.unpack(_U8)
        if n > MAX_NONCE:
            raise RemoteProtocolError(f"a nonce or proof of {n} bytes exceeds {MAX_NONCE}")
        return bytes(self.take(n))

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise RemoteProtocolError(f"{len(self.buf) - self.pos} stray bytes after frame body")


def _xfer_fields(r: _Reader) -> tuple[int, int, tuple[int, ...], tuple[tuple[int, int], ...],
                                      tuple[int, int] | None]:
    request_id, chunk, h0, h1, n_layers, n_runs = r.unpack(_XFER)
    if (h0, h1) != (0, 0) and h0 >= h1:
        raise RemoteProtocolError(f"empty head range [{h0}, {h1})")
    layers = struct.unpack(f"!{n_layers}H", r.take(2 * n_layers))
    flat = struct.unpack(f"!{2 * n_runs}I", r.take(8 * n_runs))
    runs = tuple(zip(flat[0::2], flat[1::2]))
    for start, count in runs:
        if count == 0:
            raise RemoteProtocolError(f"empty run at block {start}")
    return request_id, chunk, layers, runs, None if (h0, h1) == (0, 0) else (h0, h1)


def decode_body(h: Header, body: memoryview) -> Frame:
    """Decode a body whose header is already checked."""
    r = _Reader(body)
    if h.type == T_HELLO:
        (n,) = r.unpack(_U16)
        if n > MAX_NAME:
            raise RemoteProtocolError(f"agent name of {n} bytes exceeds {MAX_NAME}")
        name = r.text(n)
        (d,) = r.unpack(_U32)
        descriptor = bytes(r.take(d))
        nonce, proof = r.short(), r.short()
        flags, mode, n = r.unpack(_HELLO_TAIL)
        codecs = tuple(r.take(n))
        if mode not in MODES:
            raise RemoteProtocolError(f"unknown compression mode {mode} in HELLO")
        # Codecs we do not know are simply not usable with that peer.
        frame: Frame = Hello(name=name, descriptor=descriptor, version=h.version,
                             nonce=nonce, proof=proof, checksum=bool(flags & 1),
                             compression=mode, codecs=tuple(c for c in codecs if c in CODECS))
    elif h.type == T_AUTH:
        frame = Auth(r.short())
    elif h.type == T_READ:
        frame = ReadRequest(*_xfer_fields(r))
    elif h.type == T_WRITE:
        request_id, chunk, layers, runs, heads = _xfer_fields(r)
        (n,) = r.unpack(_U32)
        notify = bytes(r.take(n))
        frame = Write(request_id, chunk, layers, runs, payload_len=h.payload_len,
                      last=bool(h.flags & FLAG_LAST), notify=notify, heads=heads,
                      enc=_enc_fields(r, h.payload_len))
    elif h.type == T_DATA:
        request_id, chunk = r.unpack(_REQ)
        frame = Data(request_id, chunk, payload_len=h.payload_len,
                     enc=_enc_fields(r, h.payload_len))
    elif h.type == T_COMPLETION:
        frame = Completion(*r.unpack(_REQ))
    elif h.type == T_ERROR:
        request_id, chunk, code, n = r.unpack(_ERR)
        frame = Error(request_id, chunk, code, r.text(n))
    else:
        (n,) = r.unpack(_U16)
        frame = Close(r.text(n))
    r.end()
    return frame


@dataclass(frozen=True, slots=True)
class Note:
    """What a WRITE's notify tells the receiving agent (see the module docstring)."""

    kind: int  # NOTE_USER, NOTE_LAYERS or NOTE_FINISHED
    key: bytes = b""  # the stream's request key (NOTE_LAYERS, NOTE_FINISHED)
    layers: tuple[int, ...] = ()  # NOTE_LAYERS: the layers that landed
    message: bytes = b""  # NOTE_USER, NOTE_FINISHED: the engine's notify


def encode_note(note: Note) -> bytes:
    """Bytes of a note, for a WRITE's notify field (or a NIXL notification)."""
    if note.kind == NOTE_USER:
        return _U8.pack(NOTE_USER) + note.message
    if len(note.key) > MAX_KEY:
        raise ValueError(f"a stream's request key has at most {MAX_KEY} bytes, "
                         f"got {len(note.key)}")
    head = _U8.pack(note.kind) + _U16.pack(len(note.key)) + note.key
    if note.kind == NOTE_LAYERS:
        return head + _U16.pack(len(note.layers)) + struct.pack(f"!{len(note.layers)}H",
                                                                *note.layers)
    if note.kind == NOTE_FINISHED:
        return head + note.message
    raise ValueError(f"unknown note kind {note.kind}")


def decode_note(raw: bytes | memoryview) -> Note:
    """Parse a note; RemoteProtocolError if it is malformed."""
    r = _Reader(memoryview(raw))
    (kind,) = r.unpack(_U8)
    if kind == NOTE_USER:
        return Note(NOTE_USER, message=bytes(r.take(len(r.buf) - r.pos)))
    if kind not in (NOTE_LAYERS, NOTE_FINISHED):
        raise RemoteProtocolError(f"unknown note kind {kind}")
    (n,) = r.unpack(_U16)
    if n > MAX_KEY:
        raise RemoteProtocolError(f"request key of {n} bytes exceeds {MAX_KEY}")
    key = bytes(r.take(n))
    if kind == NOTE_FINISHED:
        return Note(NOTE_FINISHED, key, message=bytes(r.take(len(r.buf) - r.pos)))
    (count,) = r.unpack(_U16)
    layers = struct.unpack(f"!{count}H", r.take(2 * count))
    r.end()
    return Note(NOTE_LAYERS, key, layers)
