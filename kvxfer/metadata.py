"""Agent metadata: the bytes one agent hands another to be reached, and the Peer they make.

Layout: ``KVXM<protocol>.<format>`` then JSON ``{name, backend, address, descriptor,
backend_metadata (base64), incarnation}``; an agent with a secret ends the object with
``,"tag":"<hex HMAC-SHA256 of the JSON before it>"}`` (:mod:`kvxfer.auth`), and an agent
with a secret refuses metadata without that tag or with a wrong one, before anything in
it is used. The protocol version goes up with the wire protocol
(:data:`kvxfer.protocol.frames.VERSION`), the format with this JSON
(:data:`METADATA_FORMAT`; 2 added ``incarnation``, a random id that changes on every
start of an agent, so a restarted agent under the same name is never taken for its
predecessor). Metadata of another protocol or format is refused with an error that says
both versions, before any connection is tried.
"""

from __future__ import annotations

import base64
import json
import re

from . import auth
from .backends import BackendPeer, PeerInfo
from .errors import KvxferError, RemoteProtocolError
from .heads import HeadExchange
from .layout import LayoutDescriptor
from .protocol.frames import VERSION

#: Version of the metadata JSON (1: before incarnation ids; 2: with them).
METADATA_FORMAT = 2
METADATA_MAGIC = b"KVXM%d.%d" % (VERSION, METADATA_FORMAT)
_ANY_VERSION = re.compile(rb"KVXM(\d+)(?:\.(\d+))?")
_TAG = re.compile(rb',"tag":"([0-9a-f]{64})"\}$')


def encode_metadata(name: str, backend: str, address: str, descriptor: bytes,
                    backend_metadata: bytes, incarnation: str,
                    secret: bytes | None = None) -> bytes:
    body = {"name": name, "backend": backend, "address": address,
            "descriptor": json.loads(descriptor),
            "backend_metadata": base64.b64encode(backend_metadata).decode(),
            "incarnation": incarnation}
    raw = json.dumps(body, separators=(",", ":")).encode()
    if secret is not None:
        raw = raw[:-1] + b',"tag":"%s"}' % auth.metadata_tag(secret, raw).encode()
    return METADATA_MAGIC + raw


def metadata_incarnation(data: bytes) -> str:
    """The incarnation id in agent metadata (changes on every start of that agent).

    Raises:
        RemoteProtocolError: not kvxfer agent metadata of this format.
    """
    return str(_body(bytes(data))["incarnation"])


def _body(data: bytes, secret: bytes | None = None) -> dict:
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
    text = data[len(METADATA_MAGIC):]
    try:
        raw = json.loads(text.decode())
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed agent metadata: {exc}") from exc
    if secret is not None:
        tagged = _TAG.search(text)
        body = text[:tagged.start()] + b"}" if tagged else text
        auth.check_metadata_tag(secret, body, tagged and tagged.group(1).decode(),
                                raw.get("name") if isinstance(raw, dict) else None)
    if not isinstance(raw, dict) or not raw.get("incarnation"):
        raise RemoteProtocolError("malformed agent metadata: no incarnation id")
    return raw



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


def decode_metadata(data: bytes, secret: bytes | None = None) -> PeerInfo:
    """Parse another agent's :meth:`Agent.metadata` bytes.

    Args:
        secret: this agent's secret: the metadata must carry its tag.

    Raises:
        RemoteProtocolError: the bytes are not kvxfer agent metadata.
        AuthenticationFailed: with a secret, the tag is missing or wrong.
    """
    raw = _body(bytes(data), secret)
    try:
        descriptor = LayoutDescriptor.from_bytes(json.dumps(raw["descriptor"]).encode())
        return PeerInfo(name=str(raw["name"]), backend=str(raw["backend"]),
                        address=str(raw["address"]), descriptor=descriptor,
                        backend_metadata=base64.b64decode(raw["backend_metadata"]))
    except (ValueError, KeyError, TypeError, KvxferError) as exc:
        raise RemoteProtocolError(f"malformed agent metadata: {exc}") from exc
