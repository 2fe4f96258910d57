"""The codec on a two-sided backend's data path: encode a chunk out, decode one in.

A connection whose agreement is active (compression or checksums, see
:mod:`kvxfer.codec`) packs each outgoing chunk into a host staging buffer, under the
transfer's ``data_lock`` while it is active, and encodes it from there (our own copy:
the send needs no guard). An incoming payload that is encoded is received whole into a
buffer of ours, decoded to exactly its announced length and verified, and only then
placed into the KV blocks; a payload that fails any of that is refused and no byte of it
reaches the cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..codec import CodecSession, available_codecs, decode
from ..errors import RemoteProtocolError
from ..memory import RegisteredMemory
from ..protocol import Encoding
from .channel import Abandoned, Channel, Guard
from .staging import Staging


@contextmanager
def packed_raw(memory: RegisteredMemory, staging: Staging, layers: Sequence[int],
               runs: Sequence[tuple[int, int]], heads: Optional[tuple[int, int]], nbytes: int,
               guard: Optional[Guard] = None) -> Iterator[memoryview]:
    """The chunk's raw bytes packed into host ``staging`` (copied under ``guard``).

    Raises:
        Abandoned: the guard's transfer is no longer active (nothing was sent).
    """
    with staging.use(nbytes) as (tensor, view):
        assert isinstance(view, memoryview), "codec staging is host memory"
        if guard is None:
            memory.pack_into(layers, runs, tensor, heads)
        else:
            with guard.data_lock:
                if not guard.active:
                    raise Abandoned(0)
                memory.pack_into(layers, runs, tensor, heads)
        yield view


def encode_chunk(session: CodecSession, raw: memoryview) -> tuple[object, Encoding, int, int]:
    """(payload, encoding, the codec tried, payload bytes)."""
    payload, enc, tried = session.encode(raw)
    return payload, enc, tried, memoryview(payload).nbytes  # type: ignore[arg-type]


def receive_decoded(channel: Channel, payload_len: int, enc: Encoding) -> np.ndarray:
    """Receive the current frame's whole payload into our buffer and decode it.

    Raises:
        RemoteProtocolError: a codec we do not offer, a payload that does not decode to
            exactly ``enc.raw_len`` bytes, or a checksum mismatch (the payload has been
            read in full either way: the stream stays in step).
    """
    buf = bytearray(payload_len)
    channel.recv_payload([memoryview(buf)])
    if enc.codec not in available_codecs():
        raise RemoteProtocolError(f"payload encoded with codec {enc.codec}, which this "
                                  f"agent did not offer")
    return decode(buf, enc)


def place(memory: RegisteredMemory, layers: Sequence[int], runs: Sequence[tuple[int, int]],
          raw: np.ndarray, heads: Optional[tuple[int, int]], guard: Optional[Guard],
          staging: Staging) -> bool:
    """Scatter a decoded chunk into its blocks (under ``guard`` while it is active). A
    CUDA cache unpacks from ``staging`` (device or pinned memory, as the packing kernel
    needs), the decoded bytes copied there first."""
    src = torch.from_numpy(raw)
    if memory.is_host:
        return _unpack(memory, layers, runs, src, heads, guard)
    with staging.use(raw.nbytes, wait=False) as (tensor, _):
        tensor[:raw.nbytes].copy_(src)
        return _unpack(memory, layers, runs, tensor, heads, guard)


def _unpack(memory: RegisteredMemory, layers: Sequence[int], runs: Sequence[tuple[int, int]],
            src: torch.Tensor, heads: Optional[tuple[int, int]], guard: Optional[Guard]) -> bool:
    if guard is None:
        memory.unpack_from(layers, runs, src, heads)
        return True
    with guard.data_lock:
        if not guard.active:
            return False
        memory.unpack_from(layers, runs, src, heads)
        return True
