"""Test-only mirror of vLLM's KV-event msgspec types (vllm/distributed/kv_events.py).

Written from vLLM's source, independent of kvxfer's decoder: ``array_like=True`` is the
positional encoding older vLLM used, ``array_like=False`` the "type"-keyed maps of newer
vLLM. The newest fields (extra_keys, group_idx, kv_cache_spec_*) are included so the
tests prove unknown fields are ignored.
"""


from types import SimpleNamespace
from typing import Any, Union

import msgspec


def vllm_types(array_like: bool) -> SimpleNamespace:
    class EventBatch(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: Union[int, None] = None

    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False,
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

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[Union[int, bytes]]
        medium: Union[str, None]
        group_idx: Union[int, None] = None

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
                           decoder=msgspec.msgpack.Decoder(KVEventBatch))


ARRAY = vllm_types(array_like=True)
MAP = vllm_types(array_like=False)
