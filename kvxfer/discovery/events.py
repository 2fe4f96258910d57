"""What discovery reports: an agent joining or leaving."""

from __future__ import annotations

from dataclasses import dataclass

JOIN, LEAVE = "join", "leave"


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """One agent appeared in, or disappeared from, discovery.

    A restart under the same name is a ``leave`` of the old incarnation followed by a
    ``join`` of the new one (or only the ``join``, if the old entry expired first).
    """

    # "join" or "leave".
    kind: str
    # The agent's name.
    name: str
    # Its metadata (for add_peer); for a leave, what it had published.
    metadata: bytes
    # Its incarnation id (new on every start), or "" if the metadata carries none.
    incarnation: str


def incarnation_of(metadata: bytes) -> str:
    """The incarnation id in ``metadata``, or "" if it is not agent metadata we read."""
    from kvxfer.errors import RemoteProtocolError
    from kvxfer.metadata import metadata_incarnation
    try:
        return metadata_incarnation(metadata)
    except RemoteProtocolError:
        return ""


__all__ = ["JOIN", "LEAVE", "PeerEvent", "incarnation_of"]
