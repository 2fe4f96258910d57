"""Shared-secret authentication: proofs for the handshake and tags for metadata.

A deployment gives every agent the same secret (``Agent(secret=...)`` or the
``KVXFER_SECRET`` environment variable). Two agents then prove to each other that they
know it before any other frame is parsed (see :mod:`kvxfer.protocol.handshake`)::

    connecting side                                   serving side
    HELLO(name_c, desc_c, nonce_c) ------------------>
                      <------------------------------ HELLO(name_s, desc_s, nonce_s,
                                                            proof_s = P("server"))
    checks proof_s; AUTH(proof_c = P("client")) ----->
                      <------------------------------ checks proof_c; AUTH() | ERROR(E_AUTH)

    P(role) = HMAC-SHA256(secret, "kvxfer-auth/1" | role | name_c | name_s
                          | sha256(desc_c) | sha256(desc_s) | nonce_c | nonce_s)

Both nonces are fresh random bytes, so a recorded proof is worth nothing on another
connection (no replay); the proof covers both names and both layouts, so it cannot be
relayed to another agent or reused for another cache; the role label keeps one side's
proof from being reflected back as the other's. ``metadata()`` carries
HMAC-SHA256(secret, "kvxfer-metadata/1" | body), and ``add_peer`` refuses metadata whose
tag is missing or wrong before anything in it is used (for nixl, before NIXL loads the
peer's memory keys). Only :mod:`hmac`, :mod:`hashlib` and :mod:`secrets` are used.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import struct

from .errors import AuthenticationFailed
from .logs import get_logger

log = get_logger("kvxfer.auth")

ENV = "KVXFER_SECRET"
NONCE_BYTES = 32
MIN_SECRET = 16  # bytes; shorter secrets are refused (a guessable secret proves nothing)
_AUTH = b"kvxfer-auth/1"
_META = b"kvxfer-metadata/1"
CLIENT, SERVER = b"client", b"server"


def resolve_secret(secret: bytes | str | None) -> bytes | None:
    """The agent's secret: ``secret`` if given, else ``$KVXFER_SECRET``, else None.

    Raises:
        ValueError: the secret is shorter than MIN_SECRET bytes.
    """
    if secret is None:
        secret = os.environ.get(ENV) or None
    if secret is None:
        return None
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET:
        raise ValueError(f"a secret needs at least {MIN_SECRET} bytes, got {len(raw)} "
                         f"(make one with secrets.token_hex(32))")
    return raw


def warn_if_open(name: str, listen: str, secret: bytes | None) -> None:
    """Log a warning if an agent without a secret listens beyond loopback: then anyone
    who can reach the port can read and overwrite its KV cache."""
    host = listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if secret is None and not loopback:
        log.warning("agent %r listens on %s without a secret: any process that reaches it "
                    "can read and overwrite its KV cache (pass secret= or set $%s)",
                    name, listen, ENV)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _field(raw: bytes) -> bytes:
    return struct.pack("!I", len(raw)) + raw


def transcript(client: str, server: str, client_desc: bytes, server_desc: bytes,
               client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What both proofs of one connection cover (length-prefixed, so unambiguous)."""
    return b"".join(_field(x) for x in (
        client.encode(), server.encode(), hashlib.sha256(client_desc).digest(),
        hashlib.sha256(server_desc).digest(), client_nonce, server_nonce))


def prove(secret: bytes, role: bytes, script: bytes) -> bytes:
    return hmac.new(secret, _AUTH + _field(role) + script, hashlib.sha256).digest()


def verify(secret: bytes, role: bytes, script: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(prove(secret, role, script), proof)


def metadata_tag(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, _META + body, hashlib.sha256).hexdigest()


def check_metadata_tag(secret: bytes, body: bytes, tag: object, name: object) -> None:
    """Raises AuthenticationFailed unless ``tag`` is ``body``'s tag under ``secret``."""
    if not isinstance(tag, str) or not tag:
        raise AuthenticationFailed(f"metadata of {name!r} carries no tag: this agent has a "
                                   "secret, so the peer must have the same one")
    if not hmac.compare_digest(metadata_tag(secret, body), tag):
        raise AuthenticationFailed(f"metadata of {name!r} was forged or altered: its tag "
                                   "does not match this agent's secret")
