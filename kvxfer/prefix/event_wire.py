"""vLLM's KV-event wire format: event types, and msgpack batches in both encodings.

Theory of operation
-------------------
A ZMQ message is three frames::

    [topic bytes][seq: 8-byte big-endian signed][payload: msgpack EventBatch]

EventBatch is ``[ts, events]`` or ``[ts, events, data_parallel_rank]`` when vLLM
encodes structs positionally (``array_like``; each event an array whose first element
is its class name), or ``{"ts":..., "events": [...], "data_parallel_rank":...}`` with
events as maps carrying a ``"type"`` key (newer vLLM). Decoding tries the positional
form, then the map form; fields beyond the ones we read are ignored, missing trailing
fields take defaults, and ``token_ids`` / ``extra_keys`` are kept as raw msgpack (the
index never needs them, and skipping them is most of the decode time).

Block hashes may be ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) or bytes digests.
msgspec does all msgpack work; nothing here parses bytes by hand.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from kvxfer.errors import KvxferError
from kvxfer.prefix.locations import MEDIUM_TIERS

Hash = Union[int, bytes]
_NIL = msgspec.Raw(b"\xc0")  # msgpack nil, the default of a skipped raw field


class MalformedEvents(KvxferError, ValueError):
    """A payload that is not a vLLM KV-event batch."""


# ------------------------------------------------------------ public (encodable) events


class BlockStored(msgspec.Struct, array_like=True, tag=True, gc=False):
    """Blocks a worker now holds, in chain order (vLLM's ``BlockStored``)."""

    # Block hashes (ints in event form, or digests), parent first.
    block_hashes: list[Hash]
    # Hash of the first block's parent, None for a chain root.
    parent_block_hash: Hash | None = None
    # The tokens of all the blocks (len = block_size * len(block_hashes)).
    token_ids: list[int] = msgspec.field(default_factory=list)
    block_size: int = 0
    # Deprecated LoRA id; lora_name is what the hash uses.
    lora_id: int | None = None
    # Where the blocks live: None or "GPU" = gpu; "CPU", "DISK", ... (see MEDIUM_TIERS).
    medium: str | None = None
    lora_name: str | None = None
    # Per-block extra keys, as vLLM exposes them for hash reconstruction.
    extra_keys: list[Any] | None = None
    # KV-cache group of the blocks.
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, array_like=True, tag=True, gc=False):
    """Blocks a worker dropped (vLLM's ``BlockRemoved``)."""

    # The dropped blocks' hashes.
    block_hashes: list[Hash]
    # The medium they were dropped from; None = gpu.
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, array_like=True, tag=True, gc=False):
    """The worker dropped every block (vLLM's ``AllBlocksCleared``)."""


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class _PubBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


# ------------------------------------------------------------ decode-side mirrors


class _AStored(msgspec.Struct, array_like=True, tag="BlockStored", gc=False):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None = None
    token_ids: msgspec.Raw = _NIL
    block_size: int | None = None
    lora_id: int | None = None
    medium: str | None = None


class _ARemoved(msgspec.Struct, array_like=True, tag="BlockRemoved", gc=False):
    block_hashes: list[Hash]
    medium: str | None = None


class _ACleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared", gc=False):
    pass


class _ABatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Union[_AStored, _ARemoved, _ACleared]]
    data_parallel_rank: int | None = None


class _MStored(msgspec.Struct, tag="BlockStored", gc=False):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None = None
    token_ids: msgspec.Raw = _NIL
    medium: str | None = None


class _MRemoved(msgspec.Struct, tag="BlockRemoved", gc=False):
    block_hashes: list[Hash]
    medium: str | None = None


class _MCleared(msgspec.Struct, tag="AllBlocksCleared", gc=False):
    pass


class _MBatch(msgspec.Struct, gc=False):
    ts: float
    events: list[Union[_MStored, _MRemoved, _MCleared]]
    data_parallel_rank: int | None = None


STORED, REMOVED, CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"


class BatchDecoder:
    """Decodes payloads in either encoding; reusable, one per thread."""

    __slots__ = ("_array", "_map")

    def __init__(self) -> None:
        self._array = msgspec.msgpack.Decoder(_ABatch)
        self._map = msgspec.msgpack.Decoder(_MBatch)

    def decode(self, payload: bytes | memoryview) -> tuple[float, list[Any]]:
        """Decode one EventBatch payload.

        Returns:
            ``(ts, events)``; each event has ``kind`` in :data:`STORED`,
            :data:`REMOVED`, :data:`CLEARED` via :func:`event_kind`, and the fields
            ``block_hashes``, ``parent_block_hash``, ``medium`` as applicable.

        Raises:
            MalformedEvents: neither encoding fits.
        """
        try:
            batch: Any = self._array.decode(payload)
        except msgspec.MsgspecError as first:
            try:
                batch = self._map.decode(payload)
            except msgspec.MsgspecError as second:
                raise MalformedEvents(f"not a KV-event batch: {first}; as a map: {second}") \
                    from second
        return batch.ts, batch.events


def event_kind(event: Any) -> str:
    """The vLLM class name of a decoded event."""
    return type(event).__struct_config__.tag


def medium_tier(medium: str | None) -> str | None:
    """Tier of a vLLM ``medium`` string; None for a medium we do not know."""
    if medium is None:
        return "gpu"
    return MEDIUM_TIERS.get(medium.lower())


def encode_batch(events: list[Event], ts: float, data_parallel_rank: int | None = None,
                 encoding: str = "array") -> bytes:
    """Encode one EventBatch the way vLLM does.

    Args:
        events: the events, in order.
        ts: the batch's timestamp (seconds).
        data_parallel_rank: the publisher's DP rank, if any.
        encoding: ``"array"`` (positional structs) or ``"map"`` (``"type"``-keyed maps).

    Returns:
        The msgpack payload.

    Raises:
        ValueError: an unknown encoding.
    """
    if encoding == "array":
        return msgspec.msgpack.encode(_PubBatch(ts, list(events), data_parallel_rank))
    if encoding != "map":
        raise ValueError(f"encoding must be 'array' or 'map', got {encoding!r}")
    body: dict[str, Any] = {"ts": ts, "events": [
        {"type": event_kind(e), **msgspec.structs.asdict(e)} for e in events]}
    if data_parallel_rank is not None:
        body["data_parallel_rank"] = data_parallel_rank
    return msgspec.msgpack.encode(body)


__all__ = ["AllBlocksCleared", "BatchDecoder", "BlockRemoved", "BlockStored", "CLEARED",
           "Event", "MalformedEvents", "REMOVED", "STORED", "encode_batch", "event_kind",
           "medium_tier"]
