"""vLLM KV-event batches: every batch x event encoding in and out, malformed input."""

from __future__ import annotations

import msgspec
import pytest
from prefix_vllm_mirror import ARRAY, COMBO_IDS, COMBOS, VLLM

from kvxfer.prefix.event_wire import (ENCODINGS, AllBlocksCleared, BatchDecoder, BlockRemoved,
                                      BlockStored, MalformedEvents, encode_batch, event_kind,
                                      medium_tier)


@pytest.mark.parametrize("vllm", COMBOS, ids=COMBO_IDS)
def test_decodes_what_vllm_encodes(vllm):
    payload = vllm.batch(
        vllm.stored([1, 2**64 - 1], parent=None, extra_keys=[None, ("lora",)], group_idx=0,
                    kv_cache_spec_kind="full", locality="LOCAL",
                    lookahead_token_ids=[[1], [2]]),
        vllm.stored([b"\x00" * 24 + b"\x00\x00\x00\x00\x00\x00\x00\x07"], parent=2,
                    medium="CPU", group_idx=3),
        vllm.BlockRemoved([1], "GPU", 0, "LOCAL"),
        vllm.AllBlocksCleared(),
        dp=3)
    decoder = BatchDecoder()
    for _ in range(2):  # the second time the remembered event form goes first
        ts, events = decoder.decode(payload)
        assert decoder.skipped == []
    assert ts == 1.5
    assert [event_kind(e) for e in events] == ["BlockStored", "BlockStored", "BlockRemoved",
                                               "AllBlocksCleared"]
    assert events[0].block_hashes == [1, 2**64 - 1] and events[0].parent_block_hash is None
    assert events[1].block_hashes[0][-1] == 7 and events[1].medium == "CPU"
    assert events[1].parent_block_hash == 2
    assert events[2].block_hashes == [1] and events[2].medium == "GPU"
    assert [events[0].group_idx, events[1].group_idx, events[2].group_idx] == [0, 3, 0]


def test_one_decoder_follows_streams_that_change_encoding():
    decoder = BatchDecoder()
    for vllm in COMBOS * 2:
        _, events = decoder.decode(vllm.batch(vllm.stored([5], group_idx=1)))
        assert events[0].block_hashes == [5] and events[0].group_idx == 1, vllm.name

def test_decodes_old_short_positional_events_and_extra_trailing_fields():
    # Oldest vLLM: BlockStored without medium/lora_name, BlockRemoved without medium.
    payload = msgspec.msgpack.encode([2.0, [["BlockStored", [5, 6], None, [1, 2], 1, None],
                                            ["BlockRemoved", [5]],
                                            ["BlockStored", [9], 6, [3], 1, None, "GPU", None,
                                             None, 0, "future", {"x": 1}]]])
    _, events = BatchDecoder().decode(payload)
    assert [e.block_hashes for e in events] == [[5, 6], [5], [9]]
    assert events[1].medium is None and events[2].parent_block_hash == 6


@pytest.mark.parametrize("encoding,vllm", [(c.name, c) for c in COMBOS] +
                         [("vllm", VLLM), ("array", ARRAY)], ids=COMBO_IDS + ["vllm", "array"])
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
    msgspec.msgpack.encode({"ts": "yesterday", "events": []}),
    msgspec.msgpack.encode([1.0, "not a list"]),
    msgspec.msgpack.encode({"events": []}),
    msgspec.msgpack.encode("just a string"),
    b"\x93\xffnot msgpack",
    b"",
])
def test_malformed_payloads_raise_a_clear_error(payload):
    with pytest.raises(MalformedEvents, match="not a KV-event batch"):
        BatchDecoder().decode(payload)


@pytest.mark.parametrize("envelope", ["array", "map"])
def test_bad_events_are_skipped_and_the_rest_of_the_batch_is_kept(envelope):
    good = [["BlockStored", [1, 2]], {"type": "BlockRemoved", "block_hashes": [2]}]
    bad = [["BlockExploded", [1]], ["BlockStored", [1.5]], {"type": "BlockStored"}, 7]
    events = [good[0], bad[0], bad[1], good[1], bad[2], bad[3], ["AllBlocksCleared"]]
    body = [1.0, events] if envelope == "array" else {"ts": 1.0, "events": events}
    decoder = BatchDecoder()
    ts, got = decoder.decode(msgspec.msgpack.encode(body))
    assert ts == 1.0
    assert [(event_kind(e), getattr(e, "block_hashes", None)) for e in got] == \
        [("BlockStored", [1, 2]), ("BlockRemoved", [2]), ("AllBlocksCleared", None)]
    assert len(decoder.skipped) == 4 and decoder.skipped[0].startswith("event 1:")
    # The next good batch is decoded whole again.
    decoder.decode(encode_batch([AllBlocksCleared()], 2.0))
    assert decoder.skipped == []


def test_medium_to_tier_and_bad_encoding():
    assert [medium_tier(m) for m in (None, "GPU", "cpu", "LOCAL_DISK", "remote", "STORAGE")] \
        == ["gpu", "gpu", "cpu", "disk", "remote", "disk"]
    assert sorted(ENCODINGS) == ["array/array", "array/map", "map/array", "map/map"]
    assert medium_tier("tape") is None
    with pytest.raises(ValueError):
        encode_batch([], 0.0, encoding="json")
