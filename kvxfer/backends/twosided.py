"""Two-sided backends: one-sided reads and writes served over an ordered byte stream.

Theory of operation
-------------------
A transport (TCP socket, UCX stream endpoint) supplies a :class:`~.channel.Channel`: an
ordered, reliable stream of kvxfer frames to one peer. Everything above it is shared by
every two-sided backend and split by role:

    channel.py  Channel, Guard, Abandoned: what a transport supplies
    staging.py  Staging: the contiguous buffer packed chunks pass through
    server.py   ServerSide: one thread per accepted channel, answers the peer's requests
    client.py   ClientSide: our connection to a peer, a sender and a reader thread
    this file   TwoSidedBackend: connects (handshake: layouts and, with a secret, proofs
                checked; kvxfer.protocol.handshake), tracks and frees
                connections, closes

::

    initiator (ClientSide)                               target (ServerSide)
    sender thread --READ(req, chunk, layers, runs)-----> serve thread: check ids,
                  --WRITE(...) + payload ------------->   send DATA + block views
    reader thread <--DATA + payload / COMPLETION-------   or receive into block views,
                  <--ERROR(req, chunk, why)------------   then COMPLETION

- Host memory moves with scatter-gather I/O straight between the channel and KV blocks;
  CUDA memory, ``staged=True`` and scattered host blocks go through a packed staging
  buffer (a device buffer when the transport can move device memory, else pinned host).
- At most ``max_inflight`` chunks are outstanding per connection, taken round-robin
  across requests (:class:`~kvxfer.scheduler.ChunkQueue`), so memory is bounded and a
  small request waits for at most ``max_inflight`` chunks, not for a whole large one.
- One connection per peer: ``disconnect`` (a re-added peer replaces its predecessor),
  a dead channel or ``close`` fails its transfers, joins its threads and frees it.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from typing import Optional

import torch

from ..codec import Agreement, Offer, agree, available_codecs, check_mode
from ..errors import AgentClosed, PeerUnreachable, ProtocolError
from ..handle import TransferHandle
from ..logs import get_logger
from ..memory import RegisteredMemory
from ..protocol import Connection, Hello
from ..protocol.handshake import ClientHandshake, ServerHandshake
from .base import Backend, BackendConfig, BackendPeer, NotifySink, PeerInfo
from .channel import Abandoned, Channel, Guard
from .client import ClientSide
from .server import ServerSide
from .staging import Staging, StagingBudget

log = get_logger("kvxfer.twosided")

__all__ = ["Abandoned", "Channel", "ClientSide", "Guard", "ServerSide", "Staging",
           "TwoSidedBackend"]


class TwoSidedBackend(Backend):
    """Base of backends that serve peers' requests over :class:`Channel` s.

    A subclass listens in ``_listen`` (calling :meth:`serve_channel` for each peer that
    connects), opens channels in ``_open_channel``, and stops and releases its transport
    in ``_stop_listening`` and ``_release``.
    """

    one_sided = False
    staging_device: Optional[torch.device] = None  # set by transports that move device memory

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        super().__init__(agent_name, listen, config)
        self._lock = threading.Lock()
        self._closed = False
        self._memory: Optional[RegisteredMemory] = None
        self._notify: Optional[NotifySink] = None
        self._servers: set[ServerSide] = set()
        self._clients: set[ClientSide] = set()
        # Every staging buffer of this backend together (transfer_buffer_bytes).
        self.staging_budget = StagingBudget(config.transfer_buffer_bytes)
        # What we say in HELLO: the compression we want, checksums, what we decode.
        self.offer = Offer(check_mode(config.compression), config.checksum,
                           available_codecs())

    def hello(self) -> Hello:
        """Our HELLO, less nonce and proof: name, layout and codec offer."""
        assert self._memory is not None
        return Hello(self.agent_name, self._memory.descriptor_bytes,
                     checksum=self.offer.checksum, compression=self.offer.mode,
                     codecs=self.offer.codecs)

    def agree(self, peer: str, theirs: Hello, initiator: bool) -> Agreement:
        """The connection's codec, from our offer and the peer's HELLO."""
        other = Offer(theirs.compression, theirs.checksum, theirs.codecs)
        a = agree(self.offer, other) if initiator else agree(other, self.offer)
        if a.note:
            log.warning("connection %s %r: %s", "to" if initiator else "from", peer, a.note)
        return a

    # -------------------------------------------------------- transport hooks
    @abstractmethod
    def _listen(self) -> None: ...

    @abstractmethod
    def _open_channel(self, peer: PeerInfo) -> Channel: ...

    def _stop_listening(self) -> list[threading.Thread]:
        """Stop accepting peers; returns threads to join."""
        return []

    def _release(self) -> None:
        """Free the transport once every channel thread has ended."""

    # ----------------------------------------------------------------- common
    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None:
        self._memory, self._notify = memory, notify
        self._listen()

    def server_handshake(self) -> ServerHandshake:
        """The serving side's handshake for one new connection."""
        assert self._memory is not None, "start() first"
        return ServerHandshake(self.agent_name, self._memory.descriptor_bytes,
                               self.config.secret, self._memory.check_peer, self._admit,
                               ours=self.hello())

    def _admit(self) -> Optional[str]:
        with self._lock:
            served = sum(1 for s in self._servers if s.established)
        if served >= self.config.max_connections:
            return (f"agent {self.agent_name!r} already serves {served} connections "
                    "(its max_connections)")
        return None

    def serve_channel(self, channel: Channel, shake: Optional[ServerHandshake] = None) -> None:
        """Serve a peer that connected to us, on its own thread: ``shake`` is its finished
        handshake (socket transports run handshakes in a HandshakeGate), or None to run
        the handshake on that thread, whose number the cap on connections bounds."""
        server = ServerSide(self, channel, shake)
        with self._lock:
            full = shake is None and len(self._servers) >= \
                self.config.max_connections + self.config.max_handshakes
            if self._closed or full:
                channel.shutdown()
                channel.close()
                return
            self._servers.add(server)
        server.thread.start()

    def connect(self, peer: PeerInfo) -> ClientSide:
        assert self._memory is not None, "start() first"
        channel = self._open_channel(peer)
        try:
            encoder = Connection(expect_hello=False)
            shake = ClientHandshake(self.agent_name, self._memory.descriptor_bytes,
                                    self.config.secret, self._memory.check_peer, peer.name,
                                    ours=self.hello())
            channel.set_timeout(self.config.connect_timeout)
            channel.send(encoder.send(shake.hello()))
            while not shake.done:
                for frame in shake.on_event(channel.next_event()):
                    channel.send(encoder.send(frame))
            assert shake.theirs is not None
            agreement = self.agree(peer.name, shake.theirs, initiator=True)
            channel.established()
            channel.set_timeout(None)
        except (OSError, ProtocolError) as exc:
            channel.shutdown()
            channel.close()
            raise PeerUnreachable(f"hello with peer {peer.name!r} failed: {exc}") from exc
        except BaseException:
            channel.shutdown()
            channel.close()
            raise
        client = ClientSide(self, channel, encoder, peer.name, agreement)
        with self._lock:
            closed = self._closed
            if not closed:
                self._clients.add(client)
        if closed:
            channel.shutdown()
            channel.close()
            raise AgentClosed("agent closed")
        client.start()
        return client

    def submit(self, peer: BackendPeer, handle: TransferHandle) -> None:
        assert isinstance(peer, ClientSide)
        peer.submit(handle)

    def quiesce(self, handle: TransferHandle) -> None:
        """Nothing to wait for: every transport call that touches a transfer's blocks
        runs under its ``data_lock``, which ``fail`` has already waited for."""

    def disconnect(self, peer: BackendPeer, why: BaseException) -> None:
        assert isinstance(peer, ClientSide)
        peer.die(why)
        peer.join()

    def _forget(self, server: ServerSide) -> None:
        with self._lock:
            self._servers.discard(server)

    def _forget_client(self, client: ClientSide) -> None:
        with self._lock:
            self._clients.discard(client)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servers, clients = list(self._servers), list(self._clients)
        threads = self._stop_listening()
        for client in clients:
            client.die(AgentClosed("agent closed"))
        for server in servers:
            server.channel.shutdown()
        threads += [s.thread for s in servers]
        for t in threads:
            if t is not threading.current_thread() and t.ident is not None:
                t.join(timeout=10)
        for client in clients:
            client.join()
        self._release()
