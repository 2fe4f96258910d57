"""Agents find each other by name: metadata published in etcd under a lease.

``Etcd(endpoints)`` talks to etcd's JSON gateway through ``etcd3gw`` (``pip install
'kvxfer[discovery]'``), imported when the first ``Etcd`` is made: importing
``kvxfer`` or this package loads no etcd client.

    discovery = Etcd("http://10.0.0.5:2379")
    agent = Agent("decode-3", discovery=discovery)   # published on register_kv_cache
    peer = other_agent.add_peer("decode-3")          # looked up by name
"""

from __future__ import annotations

import importlib
from typing import Any

from kvxfer.discovery.events import PeerEvent

_LAZY = {"Etcd": "kvxfer.discovery.etcd", "Registration": "kvxfer.discovery.etcd",
         "Watch": "kvxfer.discovery.etcd_watch"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvxfer.discovery' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["Etcd", "PeerEvent", "Registration", "Watch"]
