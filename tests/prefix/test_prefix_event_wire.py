"""vLLM KV-event batches: both encodings in, both encodings out, malformed input."""

from __future__ import annotations

import msgspec
import pytest
from prefix_vllm_mirror import ARRAY, MAP

from kvxfer.prefix.event_wire import (BatchDecoder, BlockRemoved, BlockStored, MalformedEvents,
                                      encode_batch, event_kind, medium_tier)


@pytest.mark.parametrize("vllm", [ARRAY, MAP], ids=["array", "map"])
def test_decodes_what_vllm_encodes(vllm):
    payload = vllm.batch(
        vllm.stored([1, 2**64 - 1], parent=None, extra_keys=[None, ("lora",)], group_idx=0,
                    kv_cache_spec_kind="full"),
        vllm.stored([b"\x00" * 24 + b"\x00\x00\x00\x00\x00\x00\x00\x07"], parent=2,
                    medium="CPU"),
        vllm.BlockRemoved([1], "GPU", 0),
        vllm.AllBlocksCleared(),
        dp=3)
    ts, events = BatchDecoder().decode(payload)
    assert ts == 1.5
    assert [event_kind(e) for e in events] == ["BlockStored", "BlockStored", "BlockRemoved",
                                               "AllBlocksCleared"]
    assert events[0].block_hashes == [1, 2**64 - 1] and events[0].parent_block_hash is None
    assert events[1].block_hashes[0][-1] == 7 and events[1].medium == "CPU"
    assert events[1].parent_block_hash == 2
    assert events[2].block_hashes == [1] and events[2].medium == "GPU"


def test_decodes_old_short_positional_events_and_extra_trailing_fields():
    # Oldest vLLM: BlockStored without medium/lora_name, BlockRemoved without medium.
    payload = msgspec.msgpack.encode([2.0, [["BlockStored", [5, 6], None, [1, 2], 1, None],
                                            ["BlockRemoved", [5]],
                                            ["BlockStored", [9], 6, [3], 1, None, "GPU", None,
                                             None, 0, "future", {"x": 1}]]])
    _, events = BatchDecoder().decode(payload)
    assert [e.block_hashes for e in events] == [[5, 6], [5], [9]]
    assert events[1].medium is None and events[2].parent_block_hash == 6


@pytest.mark.parametrize("encoding,vllm", [("array", ARRAY), ("map", MAP)])
def test_encodes_what_vllm_decodes(encoding, vllm):
    events = [BlockStored([1, 2], None, [0] * 8, 4, medium="GPU"), BlockRemoved([b"\x01" * 32]),
              BlockStored([3], 2, [0] * 4, 4, lora_name="l", extra_keys=[["l"]], group_idx=1)]
    got = vllm.decoder.decode(encode_batch(events, 9.0, 2, encoding=encoding))
    assert got.ts == 9.0 and got.data_parallel_rank == 2
    assert [type(e).__name__ for e in got.events] == ["BlockStored", "BlockRemoved",
                                                      "BlockStored"]
    assert got.events[0].block_hashes == [1, 2] and got.events[0].medium == "GPU"
    assert got.events[1].block_hashes == [b"\x01" * 32]
    assert got.events[2].parent_block_hash == 2 and got.events[2].lora_name == "l"
    # And our decoder reads our own output back.
    _, ours = BatchDecoder().decode(encode_batch(events, 9.0, encoding=encoding))
    assert [e.block_hashes for e in ours] == [[1, 2], [b"\x01" * 32], [3]]


@pytest.mark.parametrize("payload", [
    b"\xff\x00garbage",
    msgspec.msgpack.encode([1.0, [["BlockExploded", [1]]]]),
    msgspec.msgpack.encode({"ts": "yesterday", "events": []}),
    msgspec.msgpack.encode([1.0, [["BlockStored", [1.5]]]]),
    msgspec.msgpack.encode("just a string"),
    b"",
])
def test_malformed_payloads_raise_a_clear_error(payload):
    with pytest.raises(MalformedEvents, match="not a KV-event batch"):
        BatchDecoder().decode(payload)


def test_medium_to_tier_and_bad_encoding():
    assert [medium_tier(m) for m in (None, "GPU", "cpu", "LOCAL_DISK", "remote")] == \
        ["gpu", "gpu", "cpu", "disk", "remote"]
    assert medium_tier("tape") is None
    with pytest.raises(ValueError):
        encode_batch([], 0.0, encoding="json")
