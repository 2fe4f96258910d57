"""The HELLO exchange as two state machines without I/O, one per side.

Theory of operation
-------------------
A connection is useful only once both sides have checked each other's layout and, with a
shared secret, each other's proof (:mod:`kvxfer.auth`). Each side feeds the frames it
receives to its machine and sends the frames the machine returns::

    ClientHandshake                                      ServerHandshake
    hello() -> HELLO(nonce_c) ------------------------>  on_event: no secret: layout
                                                          check -> HELLO | ERROR(E_LAYOUT)
                      <------------------------------    secret: HELLO(nonce_s, proof_s)
    on_event: layout check, proof_s
              -> AUTH(proof_c) ----------------------->  on_event: proof_c, layout,
                                                          room -> AUTH() | ERROR(E_AUTH,
                      <------------------------------          E_LAYOUT, E_CLOSING)
    on_event(AUTH()) -> done

The serving side parses nothing but HELLO and AUTH before it is done, and a refusal is
one ERROR frame and the end of the connection. The client raises the refusal as the
error it names (LayoutMismatch, AuthenticationFailed, RemoteError). Both machines are
driven alike by a blocking channel (the client, UCX's serve threads) and by the socket
backends' selector loop (:mod:`kvxfer.backends.gate`), which keeps connections that
have not finished their handshake off threads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from .. import auth
from ..errors import (AuthenticationFailed, LayoutMismatch, PeerUnreachable, RemoteError,
                      RemoteProtocolError)
from .connection import CLOSED, Event
from .frames import E_AUTH, E_CLOSING, E_LAYOUT, Auth, Close, Error, Frame, Hello

# Raises LayoutMismatch if the peer's descriptor bytes do not fit ours.
CheckPeer = Callable[[bytes], None]
# None when a connection may be served, else why not (the agent's connection cap).
Admit = Callable[[], Optional[str]]


class ServerHandshake:
    """The serving side of one connection's handshake.

    Args:
        name, descriptor: this agent's name and layout descriptor bytes.
        secret: the shared secret, or None (no authentication).
        check_peer: raises LayoutMismatch if the peer's descriptor does not fit.
        admit: asked once the peer has proven itself; a reason refuses it (E_CLOSING).
        ours: the HELLO we answer with, less nonce and proof (it carries our codec
            offer); default ``Hello(name, descriptor)``.
    """

    def __init__(self, name: str, descriptor: bytes, secret: Optional[bytes],
                 check_peer: CheckPeer, admit: Admit = lambda: None,
                 ours: Optional[Hello] = None) -> None:
        self.name, self.descriptor, self.secret = name, descriptor, secret
        self.check_peer, self.admit = check_peer, admit
        self.ours = ours if ours is not None else Hello(name, descriptor)
        self.peer = "?"  # the peer's name, once its HELLO came
        self.done = False  # the peer may be served
        self.refused: Optional[str] = None  # why the connection ends (set once)
        self.code: Optional[int] = None  # the ERROR code we refused with; None: peer left
        self.theirs: Optional[Hello] = None  # the peer's HELLO (its codec offer)
        self._script = b""

    @property
    def heard(self) -> bool:
        """The peer's HELLO came."""
        return self.theirs is not None

    @property
    def finished(self) -> bool:
        return self.done or self.refused is not None

    def _refuse(self, code: int, why: str) -> list[Frame]:
        self.refused, self.code = why, code
        return [Error(0, 0, code, why)]

    def _accept(self, reply: Frame) -> list[Frame]:
        assert self.theirs is not None
        try:
            self.check_peer(self.theirs.descriptor)
        except LayoutMismatch as exc:
            return self._refuse(E_LAYOUT, str(exc))
        busy = self.admit()
        if busy is not None:
            return self._refuse(E_CLOSING, busy)
        self.done = True
        return [reply]

    def on_event(self, ev: Event) -> list[Frame]:
        """Frames to send in answer to ``ev`` (a frame, or CLOSED).

        Raises:
            RemoteProtocolError: a frame that has no place in the handshake.
        """
        if self.finished:
            raise RemoteProtocolError(f"{type(ev).__name__} after the handshake ended")
        if ev is CLOSED or isinstance(ev, (Close, Error)):
            self.refused = f"peer {self.peer!r} left during the handshake"
            return []
        if isinstance(ev, Hello) and self.theirs is None:
            self.theirs, self.peer = ev, ev.name
            if self.secret is None:
                return self._accept(self.ours)
            if not ev.nonce:
                return self._refuse(E_AUTH, f"agent {self.name!r} requires authentication: "
                                    "give the connecting agent the same secret (secret= "
                                    f"or ${auth.ENV})")
            nonce = auth.new_nonce()
            self._script = auth.transcript(ev.name, self.name, ev.descriptor, self.descriptor,
                                           ev.nonce, nonce)
            return [replace(self.ours, nonce=nonce,
                            proof=auth.prove(self.secret, auth.SERVER, self._script))]
        if isinstance(ev, Auth) and self._script and self.secret is not None:
            if not auth.verify(self.secret, auth.CLIENT, self._script, ev.proof):
                return self._refuse(E_AUTH, f"peer {self.peer!r} failed authentication: its "
                                    f"proof does not match agent {self.name!r}'s secret")
            return self._accept(Auth(b""))
        raise RemoteProtocolError(f"unexpected {type(ev).__name__} during the handshake")


class ClientHandshake:
    """The connecting side of one connection's handshake.

    Args:
        name, descriptor, secret, check_peer: as for :class:`ServerHandshake`.
        expected: the name the peer must answer with (from its metadata).
        ours: as for :class:`ServerHandshake`.
    """

    def __init__(self, name: str, descriptor: bytes, secret: Optional[bytes],
                 check_peer: CheckPeer, expected: str, ours: Optional[Hello] = None) -> None:
        self.name, self.descriptor, self.secret = name, descriptor, secret
        self.check_peer, self.expected = check_peer, expected
        self.ours = ours if ours is not None else Hello(name, descriptor)
        self.done = False
        self.theirs: Optional[Hello] = None  # the peer's HELLO (its codec offer)
        self._nonce = auth.new_nonce() if secret is not None else b""
        self._waiting_for_accept = False

    def hello(self) -> Hello:
        return replace(self.ours, nonce=self._nonce)

    def on_event(self, ev: Event) -> list[Frame]:
        """Frames to send in answer to ``ev``; ``done`` once the peer accepted us.

        Raises:
            LayoutMismatch, AuthenticationFailed, RemoteError: the peer refused us, or
                we refuse it.
            PeerUnreachable: the peer closed the connection or is not who it should be.
            RemoteProtocolError: a frame that has no place in the handshake.
        """
        who = f"peer {self.expected!r}"
        if ev is CLOSED or isinstance(ev, Close):
            raise PeerUnreachable(f"{who} closed the connection during the handshake")
        if isinstance(ev, Error):
            if ev.code == E_LAYOUT:
                raise LayoutMismatch(f"{who} refused our layout: {ev.message}")
            if ev.code == E_AUTH:
                raise AuthenticationFailed(f"{who} refused us: {ev.message}")
            raise RemoteError(f"{who} refused the connection: {ev.message}", ev.code)
        if isinstance(ev, Hello) and not self._waiting_for_accept and not self.done:
            if ev.name != self.expected:
                raise PeerUnreachable(f"{who} answered as {ev.name!r}: another agent "
                                      "listens at its address")
            self.check_peer(ev.descriptor)
            self.theirs = ev
            if self.secret is None:
                self.done = True
                return []
            if not ev.nonce or not ev.proof:
                raise AuthenticationFailed(f"{who} does not authenticate (it has no secret, "
                                           "or runs a kvxfer without authentication)")
            script = auth.transcript(self.name, ev.name, self.descriptor, ev.descriptor,
                                     self._nonce, ev.nonce)
            if not auth.verify(self.secret, auth.SERVER, script, ev.proof):
                raise AuthenticationFailed(f"{who} failed authentication: its proof does "
                                           "not match this agent's secret")
            self._waiting_for_accept = True
            return [Auth(auth.prove(self.secret, auth.CLIENT, script))]
        if isinstance(ev, Auth) and self._waiting_for_accept and not ev.proof:
            self._waiting_for_accept, self.done = False, True
            return []
        raise RemoteProtocolError(f"unexpected {type(ev).__name__} during the handshake")
