"""Agent metadata: the bytes one agent hands another to be reached, and the Peer they make.

Layout: ``KVXM<protocol>.<format>`` then JSON ``{name, backend, address, descriptor,
backend_metadata (base64), incarnation}``. The protocol version goes up with the wire
protocol (:data:`kvxfer.protocol.frames.VERSION`), the format with this JSON
(:data:`METADATA_FORMAT`; 2 added ``incarnation``, a random id that changes on every
start of an agent, so a restarted agent under the same name is never taken for its
predecessor). Metadata of another protocol or format is refused with an error that says
both versions, before any connection is tried.
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

#: Version of the metadata JSON (1: before incarnation ids; 2: with them).
METADATA_FORMAT = 2
METADATA_MAGIC = b"KVXM%d.%d" % (VERSION, METADATA_FORMAT)
_ANY_VERSION = re.compile(rb"KVXM(\d+)(?:\.(\d+))?")


def encode_metadata(name: str, backend: str, address: str, descriptor: bytes,
                    backend_metadata: bytes, incarnation: str) -> bytes:
    body = {"name": name, "backend": backend, "address": address,
            "descriptor": json.loads(descriptor),
            "backend_metadata": base64.b64encode(backend_metadata).decode(),
            "incarnation": incarnation}
    return METADATA_MAGIC + json.dumps(body, separators=(",", ":")).encode()


def metadata_incarnation(data: bytes) -> str:
    """The incarnation id in agent metadata (changes on every start of that agent).

    Raises:
        RemoteProtocolError: not kvxfer agent metadata of this format.
    """
    return str(_body(bytes(data))["incarnation"])


def _body(data: bytes) -> dict:
    if not data.startswith(METADATA_MAGIC):
        other = _ANY_VERSION.match(data)
        if other and int(other.group(1)) != VERSION:
            raise RemoteProtocolError(
                f"the peer speaks kvxfer protocol version {int(other.group(1))}, this agent "
                f"version {VERSION}: run the same kvxfer release on both sides")
        if other:
            raise RemoteProtocolError(
                f"the peer's agent metadata is format {int(other.group(2) or 1)}, this "
                f"agent reads format {METADATA_FORMAT} (with incarnation ids): run the same "
                "kvxfer release on both sides")
        raise RemoteProtocolError("not kvxfer agent metadata (bad magic)")
    try:
        raw = json.loads(data[len(METADATA_MAGIC):].decode())
        if not isinstance(raw, dict) or not raw.get("incarnation"):
            raise ValueError("no incarnation id")
        return raw
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed agent metadata: {exc}") from exc


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
        # The id of the peer process's run this Peer reached (new on every restart).
        self.incarnation = metadata_incarnation(metadata)
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
    raw = _body(bytes(data))
    try:
        descriptor = LayoutDescriptor.from_bytes(json.dumps(raw["descriptor"]).encode())
        return PeerInfo(name=str(raw["name"]), backend=str(raw["backend"]),
                        address=str(raw["address"]), descriptor=descriptor,
                        backend_metadata=base64.b64decode(raw["backend_metadata"]))
    except (ValueError, KeyError, TypeError, KvxferError) as exc:
        raise RemoteProtocolError(f"malformed agent metadata: {exc}") from exc
