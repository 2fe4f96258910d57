"""kvxfer: move paged KV-cache blocks between LLM-serving processes.

Importing kvxfer loads only torch and numpy; each backend's library (ucxx, nixl, cupy,
zmq, blosc2) is imported when that feature is first used.
"""

from .agent import Agent, Peer
from .errors import (AgentClosed, AuthenticationFailed, BackendUnavailable, BlockOutOfRange,
                     ChecksumMismatch, KvxferError,
                     LayoutMismatch, LocalProtocolError, PeerUnreachable, ProtocolError,
                     RemoteError, RemoteProtocolError, TransferFailed, TransferTimeout)
from .handle import TransferHandle
from .layout import KVLayout, LayoutDescriptor, Region

__version__ = "0.1.0"

__all__ = [
    "Agent", "AgentClosed", "AuthenticationFailed", "BackendUnavailable", "BlockOutOfRange",
    "ChecksumMismatch", "KVLayout", "KvxferError",
    "LayoutDescriptor", "LayoutMismatch", "LocalProtocolError", "PeerUnreachable",
    "Peer", "ProtocolError", "Region", "RemoteError", "RemoteProtocolError", "TransferFailed",
    "TransferHandle", "TransferTimeout", "__version__",
]
