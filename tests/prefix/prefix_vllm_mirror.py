"""Test-only mirror of vLLM's KV-event msgspec types (vllm/distributed/kv_events.py).

Written from vLLM's source, independent of kvxfer's decoder. The batch and its events
are encoded apart: vLLM itself (0.30 .. 0.34) sends an ``array_like`` batch of
"type"-keyed map events (VLLM); ARRAY is all positional (older vLLM), MAP all maps, and
MAP_ARRAY the last combination. The newest fields (extra_keys, group_idx,
kv_cache_spec_*, locality, ownership, session_id, lookahead_token_ids) are included so
the tests prove unknown fields are ignored.
"""


from types import SimpleNamespace
from typing import Any, Union

import msgspec


def vllm_types(batch_array: bool, event_array: bool) -> SimpleNamespace:
    class EventBatch(msgspec.Struct, array_like=batch_array, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: Union[int, None] = None

    class KVCacheEvent(msgspec.Struct, array_like=event_array, omit_defaults=True, gc=False,
                       tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[Union[int, bytes]]
        parent_block_hash: Union[int, bytes, None]
        token_ids: list[int]
        block_size: int
        lora_id: Union[int, None]
        medium: Union[str, None]
        lora_name: Union[str, None]
        extra_keys: Union[list[Any], None] = None
        group_idx: Union[int, None] = None
        kv_cache_spec_kind: Union[str, None] = None
        kv_cache_spec_sliding_window: Union[int, None] = None
        locality: Union[str, None] = None
        ownership: Union[str, None] = None
        session_id: Union[str, None] = None
        lookahead_token_ids: Union[list[list[int]], None] = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[Union[int, bytes]]
        medium: Union[str, None]
        group_idx: Union[int, None] = None
        locality: Union[str, None] = None
        ownership: Union[str, None] = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]

    def stored(hashes, parent=None, medium=None, block_size=4, **kw):
        return BlockStored(list(hashes), parent, list(range(block_size * len(hashes))),
                           block_size, None, medium, None, **kw)

    def batch(*events, dp=None):
        return msgspec.msgpack.encode(KVEventBatch(1.5, list(events), dp))

    return SimpleNamespace(BlockStored=BlockStored, BlockRemoved=BlockRemoved,
                           AllBlocksCleared=AllBlocksCleared, KVEventBatch=KVEventBatch,
                           stored=stored, batch=batch,
                           decoder=msgspec.msgpack.Decoder(KVEventBatch),
                           name=f"{'array' if batch_array else 'map'}/"
                                f"{'array' if event_array else 'map'}")


ARRAY = vllm_types(batch_array=True, event_array=True)
VLLM = vllm_types(batch_array=True, event_array=False)
MAP = vllm_types(batch_array=False, event_array=False)
MAP_ARRAY = vllm_types(batch_array=False, event_array=True)
#: Every batch x event encoding, for parametrised tests (ids: their names).
COMBOS = [VLLM, ARRAY, MAP, MAP_ARRAY]
COMBO_IDS = [c.name for c in COMBOS]
