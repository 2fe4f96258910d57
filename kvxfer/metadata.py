"""Agent metadata: the bytes one agent hands another to be reached, and the Peer they make.

Layout: ``KVXM<version>`` then JSON ``{name, backend, address, descriptor,
backend_metadata (base64)}``. The version goes up with the wire protocol
(:data:`kvxfer.protocol.frames.VERSION`): metadata of another version is refused with
an error that says both versions, before any connection is tried.
"""

from __future__ import annotations

import base64
import json
import re
from .backends import BackendPeer, PeerInfo
from .errors import KvxferError, RemoteProtocolError
from .heads import HeadExchange
from .layout import LayoutDescriptor
from .protocol.frames import VERSION

METADATA_MAGIC = b"KVXM%d" % VERSION
_ANY_VERSION = re.compile(rb"KVXM(\d+)")


def encode_metadata(name: str, backend: str, address: str, descriptor: bytes,
                    backend_metadata: bytes) -> bytes:
    body = {"name": name, "backend": backend, "address": address,
            "descriptor": json.loads(descriptor),
            "backend_metadata": base64.b64encode(backend_metadata).decode()}
    return METADATA_MAGIC + json.dumps(body, separators=(",", ":")).encode()


class Peer:
    """A remote agent this agent can read from and write to (from :meth:`Agent.add_peer`)."""

    def __init__(self, info: PeerInfo, conn: BackendPeer, metadata: bytes,
                 heads: HeadExchange) -> None:
        self.name = info.name
        self.address = info.address
        self.descriptor: LayoutDescriptor = info.descriptor
        self.heads = heads  # which of its KV heads and ours reads and writes move
        self._conn = conn
        self._metadata = metadata  # what it was added with: the same bytes reuse it
        # What carries its bytes (set by add_peer, see kvxfer.transport), e.g. "TCP a -> b".
        self.transport = ""

    @property
    def shared_heads(self) -> range:
        """The global KV heads this peer and we both hold: what a read from it gives us
        (and a write to it gives it). A TP shard gathers its heads from peers whose
        ``shared_heads`` together cover it; for MLA, ``range(0, 1)``."""
        return self.heads.shared

    @property
    def alive(self) -> bool:
        return self._conn.alive

    def __repr__(self) -> str:
        return f"Peer({self.name!r} at {self.address}, {'up' if self.alive else 'down'})"


def decode_metadata(data: bytes) -> PeerInfo:
    """Parse another agent's :meth:`Agent.metadata` bytes.

    Raises:
        RemoteProtocolError: the bytes are not kvxfer agent metadata.
    """
    data = bytes(data)
    if not data.startswith(METADATA_MAGIC):
        other = _ANY_VERSION.match(data)
        if other:
            raise RemoteProtocolError(
                f"the peer speaks kvxfer protocol version {int(other.group(1))}, this agent "
                f"version {VERSION}: run the same kvxfer release on both sides")
        raise RemoteProtocolError("not kvxfer agent metadata (bad magic)")
    try:
        raw = json.loads(data[len(METADATA_MAGIC):].decode())
        descriptor = LayoutDescriptor.from_bytes(json.dumps(raw["descriptor"]).encode())
        return PeerInfo(name=str(raw["name"]), backend=str(raw["backend"]),
                        address=str(raw["address"]), descriptor=descriptor,
                        backend_metadata=base64.b64decode(raw["backend_metadata"]))
    except (ValueError, KeyError, TypeError, KvxferError) as exc:
        raise RemoteProtocolError(f"malformed agent metadata: {exc}") from exc
