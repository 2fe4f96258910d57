"""The one error hierarchy of kvxfer.

Everything kvxfer raises on purpose derives from :class:`KvxferError`, so an engine can
catch the library's failures in one place. Where a standard exception type says the same
thing (a bad argument, a timeout), ours also derives from it.
"""

from __future__ import annotations


class KvxferError(Exception):
    """Base of every error kvxfer raises on purpose."""


class LayoutMismatch(KvxferError, ValueError):
    """Two KV layouts cannot exchange blocks, or a layout's tensors are malformed.

    Attributes:
        field: the descriptor field (or tensor property) that differs or is wrong.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BlockOutOfRange(KvxferError, IndexError):
    """A block id (or layer index) is outside the registered layout."""


class ProtocolError(KvxferError):
    """The wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """Our own caller misused the protocol (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame; the connection is failed."""


class ChecksumMismatch(RemoteProtocolError):
    """A chunk's bytes do not match the xxh3-64 its sender computed (changed on the way)."""


class RemoteError(KvxferError):
    """The peer refused a request and said why (an ERROR frame)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class TransferFailed(KvxferError):
    """A transfer did not complete.

    Attributes:
        peer: name of the peer agent.
        request_id: the transfer's id on this agent.
        cause: the underlying exception (also chained as ``__cause__``).
    """

    def __init__(self, message: str, peer: str | None = None, request_id: int | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        self.request_id = request_id
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause


class TransferTimeout(TransferFailed, TimeoutError):
    """A transfer, or a wait on it, passed its deadline."""


class PeerUnreachable(KvxferError, ConnectionError):
    """The peer cannot be reached, or its connection died."""


class AuthenticationFailed(KvxferError):
    """A peer did not prove it knows the shared secret, or its metadata's tag is wrong
    (:mod:`kvxfer.auth`); nothing of it was used."""


class AgentClosed(KvxferError):
    """The agent (or the object used) was closed."""


class BackendUnavailable(KvxferError, ImportError):
    """A backend's library is not installed or not usable here.

    Attributes:
        backend: the backend's name.
        extra: the pip extra that installs what it needs (``pip install 'kvxfer[extra]'``).
    """

    def __init__(self, backend: str, reason: str, extra: str | None = None) -> None:
        hint = f"; install it with: pip install 'kvxfer[{extra}]'" if extra else ""
        super().__init__(f"backend {backend!r} is unavailable: {reason}{hint}")
        self.backend = backend
        self.extra = extra
        self.reason = reason


class DiscoveryError(KvxferError):
    """Peer discovery (:mod:`kvxfer.discovery`) failed."""


class DiscoveryUnavailable(DiscoveryError, ConnectionError):
    """The discovery service (etcd) cannot be reached or refused the request.

    Transfers between peers already connected are not affected; publishing resumes and
    lookups work again once the service is back.
    """


class PeerNotFound(DiscoveryError, LookupError):
    """No live agent is registered under the name that was looked up."""


__all__ = [
    "AgentClosed", "AuthenticationFailed", "BackendUnavailable", "BlockOutOfRange",
    "DiscoveryError", "DiscoveryUnavailable", "KvxferError", "LayoutMismatch",
    "LocalProtocolError", "PeerNotFound", "PeerUnreachable", "ProtocolError", "RemoteError",
    "RemoteProtocolError", "TransferFailed", "TransferTimeout",
]
