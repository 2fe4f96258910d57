"""Agent metadata: the bytes one agent hands another to be reached, and the Peer they make.

Layout: ``KVXM<version>`` then JSON ``{name, backend, address, descriptor,
backend_metadata (base64)}``; an agent with a secret ends the object with
``,"tag":"<hex HMAC-SHA256 of the JSON before it>"}`` (:mod:`kvxfer.auth`), and an agent
with a secret refuses metadata without that tag or with a wrong one, before anything in
it is used. The version goes up with the wire protocol
(:data:`kvxfer.protocol.frames.VERSION`): metadata of another version is refused with
an error that says both versions, before any connection is tried.
"""

from __future__ import annotations

import base64
import json
import re

from . import auth
from .backends import BackendPeer, PeerInfo
from .errors import AuthenticationFailed, KvxferError, RemoteProtocolError
from .heads import HeadExchange
from .layout import LayoutDescriptor
from .protocol.frames import VERSION

METADATA_MAGIC = b"KVXM%d" % VERSION
_ANY_VERSION = re.compile(rb"KVXM(\d+)")
_TAG = re.compile(rb',"tag":"([0-9a-f]{64})"\}$')


def encode_metadata(name: str, backend: str, address: str, descriptor: bytes,
                    backend_metadata: bytes, secret: bytes | None = None) -> bytes:
    body = {"name": name, "backend": backend, "address": address,
            "descriptor": json.loads(descriptor),
            "backend_metadata": base64.b64encode(backend_metadata).decode()}
    raw = json.dumps(body, separators=(",", ":")).encode()
    if secret is not None:
        raw = raw[:-1] + b',"tag":"%s"}' % auth.metadata_tag(secret, raw).encode()
    return METADATA_MAGIC + raw


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


def decode_metadata(data: bytes, secret: bytes | None = None) -> PeerInfo:
    """Parse another agent's :meth:`Agent.metadata` bytes.

    Args:
        secret: this agent's secret: the metadata must carry its tag.

    Raises:
        RemoteProtocolError: the bytes are not kvxfer agent metadata.
        AuthenticationFailed: with a secret, the tag is missing or wrong.
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
        text = data[len(METADATA_MAGIC):]
        raw = json.loads(text.decode())
        if secret is not None:
            tagged = _TAG.search(text)
            body = text[:tagged.start()] + b"}" if tagged else text
            auth.check_metadata_tag(secret, body, tagged and tagged.group(1).decode(),
                                    raw.get("name") if isinstance(raw, dict) else None)
        descriptor = LayoutDescriptor.from_bytes(json.dumps(raw["descriptor"]).encode())
        return PeerInfo(name=str(raw["name"]), backend=str(raw["backend"]),
                        address=str(raw["address"]), descriptor=descriptor,
                        backend_metadata=base64.b64decode(raw["backend_metadata"]))
    except AuthenticationFailed:
        raise
    except (ValueError, KeyError, TypeError, KvxferError) as exc:
        raise RemoteProtocolError(f"malformed agent metadata: {exc}") from exc
