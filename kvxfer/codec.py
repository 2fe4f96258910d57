"""Per-chunk codec of the two-sided backends: shuffle, compress, checksum; and back.

Theory of operation
-------------------
The codec sits between the chunk scheduler and a two-sided backend (tcp, ucx, nccl).
Every chunk travels as one frame payload; its ENC field (protocol version 5) says how::

    sender:   raw chunk --shuffle--> --compress--> payload    ENC(codec, shuffle, elem,
              (packed)     by elem     lz4 | zstd               raw_len, xxh3 of raw)
    receiver: payload --decompress to exactly raw_len--> --unshuffle--> raw
              --xxh3 == ENC.xxh3?--> place into the KV blocks  (else: refused, nothing
                                                                placed)

- ``lz4``: bit shuffle by element size, then LZ4 at level 1; ``zstd``: byte shuffle by
  element size, then zstd at level 1. Both are done by ``blosc2`` in one pass over
  cache-sized blocks. Measured here on real bf16 KV (benchmarks/bench_codec.py): a bit
  shuffle makes LZ4 worth something (ratio 1.25; a byte shuffle 1.16, bare 0.996), and
  blosc2's fused pass compresses at ~1 GB/s on one core, three times the ``bitshuffle``
  package followed by the ``lz4`` package (ratio 1.28, ~0.3 GB/s, which made a 1 Gbit/s
  read slower than sending the raw bytes: 80 MB/s against 119).
- ``auto``: per connection and direction, :class:`AutoPolicy` measures the rate at which
  raw bytes actually go out uncompressed, with lz4 and with zstd, uses the fastest, and
  tries its neighbours again from time to time.
- Checksums: xxh3-64 of the raw chunk, computed before encoding and checked after
  decoding, before a byte reaches the KV cache. The nixl backend uses the same
  :func:`checksum` over its landing buffers and blocks (:mod:`.backends.nixl_checksums`).

Both sides say in HELLO what they want and what they can decode; :func:`agree` turns the
two offers into one :class:`Agreement` per connection, the same on both sides.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .errors import ChecksumMismatch, RemoteProtocolError
from .logs import get_logger
from .protocol.frames import Encoding

log = get_logger("kvxfer.codec")

NONE, LZ4, ZSTD = 0, 1, 2  # codec ids on the wire
AUTO = 3  # a mode, not a codec
IDLE = 0.001  # seconds a sender waits for work before its next chunk is not a sample
SHUFFLE_NONE, SHUFFLE_BYTE, SHUFFLE_BIT = 0, 1, 2
MODES = {"none": NONE, "lz4": LZ4, "zstd": ZSTD, "auto": AUTO}
MODE_NAMES = {v: k for k, v in MODES.items()}
EXTRA = "pip install 'kvxfer[compress]'"
TWO_SIDED = ("tcp", "ucx", "nccl")  # backends with the codec on their data path
ONE_SIDED = ("nixl",)  # no compression; checksums, verified by the reader


def available_codecs() -> tuple[int, ...]:
    """Codec ids this process can encode and decode (their library is installed; it is
    imported only when a chunk is first encoded or decoded)."""
    return (NONE, LZ4, ZSTD) if importlib.util.find_spec("blosc2") is not None else (NONE,)


def check_mode(compression: str, codecs: Optional[tuple[int, ...]] = None) -> int:
    """The wire id of a ``compression`` setting.

    Raises:
        ValueError: an unknown setting, or a codec whose library is missing.
    """
    if compression not in MODES:
        raise ValueError(f"compression must be one of {sorted(MODES)}, got {compression!r}")
    mode = MODES[compression]
    have = available_codecs() if codecs is None else codecs
    if mode in (LZ4, ZSTD) and mode not in have:
        raise ValueError(f"compression={compression!r} needs its library: {EXTRA}")
    return mode


# ----------------------------------------------------------------- agreement
@dataclass(frozen=True, slots=True)
class Offer:
    """What one side says in HELLO."""

    mode: int  # NONE, LZ4, ZSTD or AUTO
    checksum: bool
    codecs: tuple[int, ...]  # what it can decode (and so encode)


@dataclass(frozen=True, slots=True)
class Agreement:
    """What a connection does, the same on both sides.

    Attributes:
        mode: NONE, LZ4, ZSTD (always that codec) or AUTO (a rung of ``ladder``).
        codec: the codec used when compressing (auto: its first; NONE if none is shared).
        checksum: every chunk carries an xxh3-64 of its raw bytes.
        note: why the connection does less than was asked ("" when it does not).
    """

    mode: int = NONE
    codec: int = NONE
    checksum: bool = False
    note: str = ""
    ladder: tuple[int, ...] = (NONE,)  # auto: the settings it chooses among

    @property
    def active(self) -> bool:
        return self.codec != NONE or self.checksum


def agree(initiator: Offer, acceptor: Offer) -> Agreement:
    """One connection's codec from both offers: the initiator's wish, else the
    acceptor's; a codec only one side has is not used (the connection goes uncompressed
    and ``note`` says why); checksums when either side wants them."""
    mode = initiator.mode if initiator.mode != NONE else acceptor.mode
    shared = [c for c in (LZ4, ZSTD) if c in initiator.codecs and c in acceptor.codecs]
    note = ""
    if mode == AUTO:
        codec = shared[0] if shared else NONE
        if not shared:
            note = "auto: no codec both sides can decode; sending uncompressed"
    elif mode in (LZ4, ZSTD):
        codec = mode if mode in shared else NONE
        if codec == NONE:
            note = (f"compression={MODE_NAMES[mode]!r}: the peer cannot decode it "
                    f"(it offers {[MODE_NAMES[c] for c in acceptor.codecs]}, we offer "
                    f"{[MODE_NAMES[c] for c in initiator.codecs]}); sending uncompressed")
    else:
        codec = NONE
    return Agreement(mode if codec != NONE else NONE, codec,
                     initiator.checksum or acceptor.checksum, note,
                     (NONE, *shared) if mode == AUTO and shared else (NONE,))


# -------------------------------------------------------------- the codecs
def checksum(raw: memoryview | bytes) -> int:
    """xxh3-64 of ``raw``."""
    import xxhash

    return xxhash.xxh3_64_intdigest(raw)


def checksum_parts(parts: Iterable[memoryview | bytes]) -> int:
    """xxh3-64 of the concatenation of ``parts`` (equal to ``checksum(b"".join(parts))``),
    without joining them."""
    import xxhash

    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


def encode(raw: memoryview, codec: int, elem: int) -> tuple[bytes, int]:
    """(payload, shuffle id) of the raw chunk ``raw`` under ``codec``."""
    if codec not in (LZ4, ZSTD):
        raise ValueError(f"unknown codec {codec}")
    import blosc2

    lz4 = codec == LZ4
    out = blosc2.compress2(raw, typesize=elem, clevel=1,
                           codec=blosc2.Codec.LZ4 if lz4 else blosc2.Codec.ZSTD,
                           filters=[blosc2.Filter.BITSHUFFLE if lz4 else blosc2.Filter.SHUFFLE],
                           nthreads=1)
    return out, SHUFFLE_BIT if lz4 else SHUFFLE_BYTE


def decode(payload: memoryview | bytes, enc: Encoding) -> np.ndarray:
    """The raw chunk of a payload, as a uint8 array of exactly ``enc.raw_len`` bytes,
    its checksum verified.

    Raises:
        RemoteProtocolError: the payload does not decode to exactly ``raw_len`` bytes,
            or its checksum does not match. Nothing is placed.
    """
    n = enc.raw_len
    if enc.codec == NONE:
        raw = np.frombuffer(payload, dtype=np.uint8)
    elif enc.codec in (LZ4, ZSTD):
        raw = _decode_blosc2(payload, enc)
    else:
        raise RemoteProtocolError(f"unknown codec {enc.codec}")
    if raw.nbytes != n:
        raise RemoteProtocolError(f"a compressed payload decoded to {raw.nbytes} bytes, "
                                  f"not the {n} its frame announced")
    if enc.checksum is not None:
        got = checksum(memoryview(raw))
        if got != enc.checksum:
            raise ChecksumMismatch(f"checksum mismatch: the chunk's xxh3-64 is {got:016x}, "
                                   f"the sender's {enc.checksum:016x} (bytes changed on the "
                                   f"way); nothing of it was placed")
    return raw


def _decode_blosc2(payload: memoryview | bytes, enc: Encoding) -> np.ndarray:
    """Decode a blosc2 chunk after checking its header against the frame (sizes first:
    a lying header must not make us allocate or write past ``raw_len``)."""
    import blosc2

    name = MODE_NAMES[enc.codec]
    if enc.shuffle != (SHUFFLE_BIT if enc.codec == LZ4 else SHUFFLE_BYTE):
        raise RemoteProtocolError(f"{name} payload with shuffle {enc.shuffle}: not what "
                                  f"we send")
    try:
        nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(payload)
    except Exception as exc:  # noqa: BLE001 - any failure to read the header is the peer's
        raise RemoteProtocolError(f"{name} payload has no valid header: {exc}") from exc
    if nbytes != enc.raw_len or cbytes != len(payload):
        raise RemoteProtocolError(f"{name} payload says {nbytes} raw bytes in {cbytes}; the "
                                  f"frame announced {enc.raw_len} in {len(payload)}")
    out = np.empty(enc.raw_len, dtype=np.uint8)
    try:
        written = blosc2.decompress2(payload, dst=out)
    except Exception as exc:  # noqa: BLE001 - a corrupt payload
        raise RemoteProtocolError(f"{name} payload does not decode: {exc}") from exc
    if isinstance(written, int) and written != enc.raw_len:
        raise RemoteProtocolError(f"a compressed payload decoded to {written} bytes, not "
                                  f"the {enc.raw_len} its frame announced")
    return out


# ------------------------------------------------------------------- auto
class AutoPolicy:
    """Which setting the next chunk goes with, per connection and direction, by what is
    measured on the chunks actually sent.

    Settings form a ladder, each compressing harder and slower than the one before:
    ``(NONE, LZ4, ZSTD)`` or those of it both sides have. A chunk's sample is the rate at
    which its raw bytes went out: raw bytes over the time from when it could start (its
    request came, or the previous chunk went) to when its frame was sent, so encoding,
    a slow link and a slow receiver (its TCP window) all count; an EWMA per setting is
    kept. The connection opens with ``probe`` chunks uncompressed, then climbs the
    ladder while each rung is faster than the one below; it then runs the fastest and
    every ``period`` chunks tries a neighbour of it again (data and links change). The
    first sample of a phase, which still pays for the previous setting's queued bytes,
    is not counted, nor is a chunk that found the sender idle (its send only filled an
    empty socket buffer); a probe whose encoding alone is slower than the best rate, or whose
    first sample is clearly slower, ends at once, so a probe costs a chunk or two.
    """

    def __init__(self, ladder: tuple[int, ...] = (NONE, LZ4), probe: int = 3,
                 period: int = 64, alpha: float = 0.3) -> None:
        self.ladder, self.probe, self.period, self.alpha = ladder, probe, period, alpha
        self.rate: dict[int, Optional[float]] = {c: None for c in ladder}
        self.ratio: dict[int, float] = {}  # raw / payload per codec (EWMA)
        self.cur = 0  # index of the rung the next chunk uses
        self.best = 0  # index of the rung to run
        self.phase = "open"  # open (climbing), probe (a neighbour), run (the best)
        self.switches = 0  # how often the best rung changed after the opening
        self._left = probe  # chunks left in this phase
        self._skip = 1  # samples still to drop in this phase
        self._since = 0  # chunks since the last probe
        self._side = 1  # the neighbour the next probe tries (+1 or -1)
        self._prev_end = 0.0

    def choose(self) -> int:
        """The codec of the next chunk (NONE: uncompressed)."""
        return self.ladder[self.cur]

    def _r(self, i: int) -> float:
        return self.rate[self.ladder[i]] or 0.0

    def record(self, codec: int, raw: int, payload: int, began: float, ended: float,
               encode_s: float = 0.0, idle: bool = False) -> None:
        """One chunk went with ``codec``: ``raw`` bytes as ``payload`` bytes, from
        ``began`` to ``ended``; ``encode_s`` of it was spent encoding; ``idle``: the
        sender had waited for it (its socket buffer may have drained, so its send was
        cheap: not a sample)."""
        start = max(began, self._prev_end)
        self._prev_end = ended
        if codec != NONE:
            r, old = raw / max(payload, 1), self.ratio.get(codec)
            self.ratio[codec] = r if old is None else old + self.alpha * (r - old)
        if codec != self.ladder[self.cur]:
            return  # a chunk decided before the last switch
        sample = raw / max(ended - start, 1e-6)
        counted = not self._skip and not idle
        if self._skip:
            self._skip -= 1
        elif counted:
            old = self.rate[codec]
            self.rate[codec] = sample if old is None else old + self.alpha * (sample - old)
        self._left -= 1
        if self.cur != self.best and self.rate[self.ladder[self.best]]:
            bar = self._r(self.best)
            if (encode_s and raw / encode_s < 0.9 * bar) or \
                    (counted and self._r(self.cur) < 0.8 * bar):
                self._left = 0  # cannot win: stop paying for this probe
        if self._left <= 0:
            self._next_phase()

    def _next_phase(self) -> None:
        if self.phase == "open":
            if self.cur > 0 and self._r(self.cur) <= self._r(self.cur - 1):
                self.best = self.cur - 1  # this rung is slower: stop climbing
            elif self.cur + 1 < len(self.ladder):
                self.best = self.cur
                return self._go(self.cur + 1, self.probe, "open")
            else:
                self.best = self.cur
            return self._go(self.best, 1, "run")
        if self.phase == "probe":
            faster = self._r(self.cur) > self._r(self.best)
            if faster:
                self.switches += 1
                log.debug("auto: %s now (%s)", MODE_NAMES[self.ladder[self.cur]],
                          {MODE_NAMES[c]: round((r or 0) / 1e6) for c, r in self.rate.items()})
                self.best = self.cur
            return self._go(self.best, 1, "run")
        self._since += 1
        if self._since >= self.period and len(self.ladder) > 1:
            self._since = 0
            side = self._side if 0 <= self.best + self._side < len(self.ladder) \
                else -self._side
            self._side = -side
            return self._go(self.best + side, self.probe, "probe")
        self._go(self.best, 1, "run")

    def _go(self, index: int, left: int, phase: str) -> None:
        if index != self.cur:
            self._skip = 1
        if phase != "run":
            self.rate[self.ladder[index]] = None  # measure it afresh
        self.cur, self._left, self.phase = index, left, phase


# ---------------------------------------------------------------- sessions
class CodecSession:
    """The codec of one connection in one role (a sender and receiver of chunks).

    Args:
        agreement: what the connection agreed.
        elem: element size of the KV dtype (the shuffle's unit).
    """

    def __init__(self, agreement: Agreement, elem: int) -> None:
        self.agreement = agreement
        self.elem = elem
        self.auto = AutoPolicy(agreement.ladder) if agreement.mode == AUTO else None
        self.compressed_chunks = 0  # chunks sent compressed
        self.raw_chunks = 0  # chunks sent as they are
        self._encode_s = 0.0  # seconds the last encode took
        self._began, self._idle = time.perf_counter(), True  # the current chunk's start

    @property
    def active(self) -> bool:
        """Chunks go through the codec (compressed, checksummed or both)."""
        return self.agreement.active

    def _codec(self) -> int:
        return self.auto.choose() if self.auto is not None else self.agreement.codec

    def next_encoded(self) -> bool:
        """Whether the next chunk goes through the codec; when not (``auto`` sending
        uncompressed, no checksums), it takes the backend's zero-copy path, and
        :meth:`sent` is still told of it."""
        return self.agreement.checksum or self._codec() != NONE

    def encode(self, raw: memoryview) -> tuple[object, Encoding, int]:
        """(payload buffer, its Encoding, the codec tried) of one raw chunk; the
        payload is the raw bytes when compressing did not make them smaller."""
        t0 = time.perf_counter()
        sum_ = checksum(raw) if self.agreement.checksum else None
        codec = self._codec()
        if codec != NONE:
            payload, shuffle = encode(raw, codec, self.elem)
            self._encode_s = time.perf_counter() - t0
            if len(payload) < raw.nbytes:  # never send more than the raw bytes
                self.compressed_chunks += 1
                return payload, Encoding(codec, shuffle, self.elem, raw.nbytes, sum_), codec
        self._encode_s = 0.0
        self.raw_chunks += 1
        return raw, Encoding(NONE, SHUFFLE_NONE, 1, raw.nbytes, sum_), codec

    def took_work(self, waited: float) -> None:
        """The sender took its next piece of work after waiting ``waited`` seconds."""
        self._began, self._idle = time.perf_counter(), waited > IDLE

    def sent(self, codec: int, raw: int, payload: int) -> None:
        """A chunk's frame went out with ``codec`` tried (for ``auto``)."""
        if self.auto is not None:
            self.auto.record(codec, raw, payload, self._began, time.perf_counter(),
                             self._encode_s if codec != NONE else 0.0, self._idle)
