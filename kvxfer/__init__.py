"""kvxfer: move paged KV-cache blocks between LLM-serving processes.

Importing kvxfer loads only torch and numpy; each backend's library (ucxx, nixl, cupy,
zmq, lz4) is imported when that feature is first used.
"""

from .errors import (AgentClosed, BackendUnavailable, BlockOutOfRange, KvxferError,
                     LayoutMismatch, LocalProtocolError, PeerUnreachable, ProtocolError,
                     RemoteError, RemoteProtocolError, TransferFailed, TransferTimeout)
from .layout import KVLayout, LayoutDescriptor, Region

__version__ = "0.1.0"

__all__ = [
    "AgentClosed", "BackendUnavailable", "BlockOutOfRange", "KVLayout", "KvxferError",
    "LayoutDescriptor", "LayoutMismatch", "LocalProtocolError", "PeerUnreachable",
    "ProtocolError", "Region", "RemoteError", "RemoteProtocolError", "TransferFailed",
    "TransferTimeout", "__version__",
]
