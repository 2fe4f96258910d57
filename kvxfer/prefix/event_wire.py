"""vLLM's KV-event wire format: event types, and msgpack batches in every encoding.

Theory of operation
-------------------
A ZMQ message is three frames::

    [topic bytes][seq: 8-byte big-endian signed][payload: msgpack EventBatch]

EventBatch is ``[ts, events, data_parallel_rank]`` (msgspec ``array_like``) or a map
``{"ts", "events", "data_parallel_rank"}``; each event is an array whose first element
is its class name, or a map with a ``"type"`` key. Every combination is read::

    batch / event   array                        map ("type")
    array           older vLLM, kvxfer "array"   vLLM (0.30 to 0.34 checked)
    map             other publishers             kvxfer "map", other publishers

The envelope's first byte picks array or map; the event form that worked last is tried
first. Fields beyond the ones we read are ignored, missing trailing fields take
defaults, and ``token_ids`` / ``extra_keys`` are kept as raw msgpack. ``group_idx`` (the
KV-cache group) is read; None means group 0.

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


def _event_types(array_like: bool) -> tuple[type, type, type]:
    """The three events as we read them, in one encoding. Fields we never read are
    kept as raw msgpack (skipping them is most of the decode time)."""

    class Stored(msgspec.Struct, array_like=array_like, tag="BlockStored", gc=False):
        block_hashes: list[Hash]
        parent_block_hash: Hash | None = None
        token_ids: msgspec.Raw = _NIL
        block_size: msgspec.Raw = _NIL
        lora_id: msgspec.Raw = _NIL
        medium: str | None = None
        lora_name: msgspec.Raw = _NIL
        extra_keys: msgspec.Raw = _NIL
        group_idx: int | None = None

    class Removed(msgspec.Struct, array_like=array_like, tag="BlockRemoved", gc=False):
        block_hashes: list[Hash]
        medium: str | None = None
        group_idx: int | None = None

    class Cleared(msgspec.Struct, array_like=array_like, tag="AllBlocksCleared", gc=False):
        pass

    return Stored, Removed, Cleared


def _batch_type(batch_array: bool, events: Any) -> type:
    return msgspec.defstruct("Batch", [("ts", float), ("events", list[events]),
                                       ("data_parallel_rank", Union[int, None], None)],
                             array_like=batch_array, gc=False)


_ARRAY_EVENTS = _event_types(True)
_MAP_EVENTS = _event_types(False)
_EVENT_FORMS = {"array": Union[_ARRAY_EVENTS], "map": Union[_MAP_EVENTS]}  # type: ignore

#: Accepted encodings, named ``batch/events``; vLLM >= 0.7 sends ``array/map``.
ENCODINGS: dict[str, tuple[bool, bool]] = {"array/array": (True, True),
                                           "array/map": (True, False),
                                           "map/map": (False, False),
                                           "map/array": (False, True)}
#: Short names of encode_batch: "vllm" is what vLLM itself sends.
ALIASES = {"vllm": "array/map", "array": "array/array", "map": "map/map"}

STORED, REMOVED, CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"
_MSGPACK_ARRAY = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_MSGPACK_MAP = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


class BatchDecoder:
    """Decodes payloads in any of the four encodings; reusable, one per thread.

    The envelope's first byte says whether the batch is an array or a map; the event
    encoding that worked last is tried first, so a stream from one engine costs one
    decode per batch. A batch whose envelope is sound but some of whose events are not
    is decoded event by event: the good events are returned, the bad ones described in
    :attr:`skipped`.
    """

    __slots__ = ("_strict", "_loose", "_event", "_order", "skipped")

    def __init__(self) -> None:
        self._strict = {name: msgspec.msgpack.Decoder(_batch_type(b, _EVENT_FORMS[
            "array" if e else "map"])) for name, (b, e) in ENCODINGS.items()}
        self._loose = {b: msgspec.msgpack.Decoder(_batch_type(b, msgspec.Raw))
                       for b in (True, False)}
        self._event = {form: msgspec.msgpack.Decoder(kind)
                       for form, kind in _EVENT_FORMS.items()}
        # Event form tried first for array / map envelopes; the last one that worked.
        self._order = {True: ["map", "array"], False: ["map", "array"]}
        #: Why each event of the last decoded batch was skipped (empty: none was).
        self.skipped: list[str] = []

    def decode(self, payload: bytes | memoryview) -> tuple[float, list[Any]]:
        """Decode one EventBatch payload.

        Returns:
            ``(ts, events)``; each event's vLLM class name is :func:`event_kind`, and it
            has ``block_hashes``, ``parent_block_hash``, ``medium``, ``group_idx`` as
            applicable. Events that could not be read are left out and described in
            :attr:`skipped`.

        Raises:
            MalformedEvents: the payload is not a KV-event batch at all.
        """
        self.skipped = []
        first = payload[0] if len(payload) else -1
        if first in _MSGPACK_ARRAY:
            batch_array = True
        elif first in _MSGPACK_MAP:
            batch_array = False
        else:
            raise MalformedEvents(f"not a KV-event batch: msgpack of type byte {first:#x}, "
                                  "want an array or a map" if first >= 0 else
                                  "not a KV-event batch: an empty payload")
        order = self._order[batch_array]
        envelope = "array" if batch_array else "map"
        for form in order:
            try:
                batch: Any = self._strict[f"{envelope}/{form}"].decode(payload)
            except msgspec.MsgspecError:
                continue
            if form != order[0]:
                order.reverse()
            return batch.ts, batch.events
        return self._decode_each(payload, batch_array)

    def _decode_each(self, payload: bytes | memoryview,
                     batch_array: bool) -> tuple[float, list[Any]]:
        try:
            batch: Any = self._loose[batch_array].decode(payload)
        except msgspec.MsgspecError as exc:
            raise MalformedEvents(f"not a KV-event batch: {exc}") from exc
        events = []
        for i, raw in enumerate(batch.events):
            errors = []
            for form in self._order[batch_array]:
                try:
                    events.append(self._event[form].decode(raw))
                    break
                except msgspec.MsgspecError as exc:
                    errors.append(f"as {form}: {exc}")
            else:
                self.skipped.append(f"event {i}: {'; '.join(errors)}")
        return batch.ts, events


def event_kind(event: Any) -> str:
    """The vLLM class name of a decoded event."""
    return type(event).__struct_config__.tag


def medium_tier(medium: str | None) -> str | None:
    """Tier of a vLLM ``medium`` string; None for a medium we do not know."""
    if medium is None:
        return "gpu"
    return MEDIUM_TIERS.get(medium.lower())


def encode_batch(events: list[Event], ts: float, data_parallel_rank: int | None = None,
                 encoding: str = "vllm") -> bytes:
    """Encode one EventBatch as vLLM does (or as older / other publishers do).

    Args:
        events: the events, in order.
        ts: the batch's timestamp (seconds).
        data_parallel_rank: the publisher's DP rank, if any.
        encoding: one of :data:`ENCODINGS` (``batch/events``) or an alias:
            ``"vllm"`` (``array/map``, vLLM's own), ``"array"``, ``"map"``.

    Returns:
        The msgpack payload.

    Raises:
        ValueError: an unknown encoding.
    """
    name = ALIASES.get(encoding, encoding)
    if name not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS) + sorted(ALIASES)}, "
                         f"got {encoding!r}")
    batch_array, events_array = ENCODINGS[name]
    if batch_array and events_array:
        return msgspec.msgpack.encode(_PubBatch(ts, list(events), data_parallel_rank))
    body: list[Any] = list(events) if events_array else [
        {"type": event_kind(e), **msgspec.structs.asdict(e)} for e in events]
    if batch_array:
        return msgspec.msgpack.encode([ts, body] + ([] if data_parallel_rank is None
                                                    else [data_parallel_rank]))
    envelope: dict[str, Any] = {"ts": ts, "events": body}
    if data_parallel_rank is not None:
        envelope["data_parallel_rank"] = data_parallel_rank
    return msgspec.msgpack.encode(envelope)


__all__ = ["ALIASES", "AllBlocksCleared", "BatchDecoder", "BlockRemoved", "BlockStored",
           "CLEARED", "ENCODINGS", "Event", "MalformedEvents", "REMOVED", "STORED", "encode_batch", "event_kind",
           "medium_tier"]
