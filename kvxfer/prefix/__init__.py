"""Block-level prefix-cache index: which workers hold a request's prefix, on which tier.

Importing this package loads only numpy. xxhash is imported when a fast-mode
:class:`BlockHasher` is made; zmq and msgspec when the event subscriber or publisher
is first used (``pip install 'kvxfer[events]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

from kvxfer.prefix.hashing import (BlockHasher, PrefixHashState, event_hash, key_scheme_for,
                                   sha256_cbor)
from kvxfer.prefix.index import IndexConfig, IndexStats, PrefixIndex
from kvxfer.prefix.locations import TIERS, Location, Overlap
from kvxfer.prefix.routing import RouteDecision, RoutingConfig, route

# name -> module that defines it; imported on first attribute access (needs zmq, msgspec).
_LAZY = {
    "KVEventSubscriber": "kvxfer.prefix.subscriber",
    "SubscriberConfig": "kvxfer.prefix.subscriber",
    "SubscriberStats": "kvxfer.prefix.subscriber",
    "KVEventPublisher": "kvxfer.prefix.publisher",
    "PublisherConfig": "kvxfer.prefix.publisher",
    "BlockStored": "kvxfer.prefix.event_wire",
    "BlockRemoved": "kvxfer.prefix.event_wire",
    "AllBlocksCleared": "kvxfer.prefix.event_wire",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvxfer.prefix' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["AllBlocksCleared", "BlockHasher", "BlockRemoved", "BlockStored", "IndexConfig",
           "IndexStats", "KVEventPublisher", "KVEventSubscriber", "Location", "Overlap",
           "PrefixHashState", "PrefixIndex", "PublisherConfig", "RouteDecision",
           "RoutingConfig", "SubscriberConfig", "SubscriberStats", "TIERS", "event_hash",
           "key_scheme_for", "route", "sha256_cbor"]
