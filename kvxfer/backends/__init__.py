"""Backend registry: name -> "module:Class" and the pip extra that makes it work.

Classes are imported on first use, so importing kvxfer never imports ucxx, nixl or
torch.distributed. Third-party backends register under the entry-point group
``kvxfer.backends`` (name = "package.module:Class").
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Mapping

from ..errors import BackendUnavailable
from .base import Backend, BackendConfig, BackendPeer, PeerInfo

# name -> (import path, pip extra or None)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "nccl": ("kvxfer.backends.nccl:NcclBackend", None),  # torch.distributed, in torch
    "nixl": ("kvxfer.backends.nixl:NixlBackend", "nixl"),
    "tcp": ("kvxfer.backends.tcp:TcpBackend", None),
    "ucx": ("kvxfer.backends.ucx:UcxBackend", "ucx"),
}


def _table() -> dict[str, tuple[str, str | None]]:
    table = dict(_BUILTIN)
    for ep in entry_points(group="kvxfer.backends"):
        table.setdefault(ep.name, (ep.value, None))
    return dict(sorted(table.items()))


def registered_backends() -> Mapping[str, tuple[str, str | None]]:
    """Read-only view of every known backend: name -> (import path, pip extra)."""
    return MappingProxyType(_table())


def get_backend(name: str) -> type[Backend]:
    """Import and return the backend class registered as ``name``.

    Raises:
        BackendUnavailable: unknown name, or its library is not installed (the error
            names the pip extra).
    """
    table = _table()
    if name not in table:
        raise BackendUnavailable(name, f"no such backend; known: {', '.join(table)}")
    path, extra = table[name]
    module_name, _, cls_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(name, f"cannot import {exc.name or module_name}: {exc}",
                                 extra) from exc
    return getattr(module, cls_name)


__all__ = ["Backend", "BackendConfig", "BackendPeer", "PeerInfo", "get_backend",
           "registered_backends"]
