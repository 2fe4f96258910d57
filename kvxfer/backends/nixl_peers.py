"""NIXL per-peer connections: posting, polling and settling the xfers sent to a peer.

Theory of operation
-------------------
A :class:`NixlPeer` is one connected remote NIXL agent: its prepared descriptor list,
the transfers submitted to it (a :class:`~kvxfer.scheduler.ChunkQueue`) and the NIXL
xfers posted on it, keyed by (request id, chunk index). :class:`NixlPeerLinks` is what
the backend does on those connections; the backend's lock (``_cond``) guards every
peer field and NIXL call. :class:`~kvxfer.backends.nixl.NixlBackend` mixes it in and
its poll thread drives it.

A chunk (layers x runs) becomes one ``make_prepped_xfer`` over the matching local and
remote indices (see :mod:`.nixl_descriptors`); NIXL merges indices contiguous on both
sides, so a run of blocks in a dense region is one operation. READ pulls the peer's
blocks into ours; WRITE pushes. The peer's CPU is not involved. A posted xfer's life::

    queue.next -> make_prepped_xfer + transfer -> xfers[key] -> check_xfer_state
                  (a read: into a landing buffer)                 PROC: poll again
                          released, slot freed (queue.finish)  <- DONE: write: chunk_done
                                                                   read: _land, chunk_done
                                                               <- ERR:  peer dead

- ``settle`` (for ``quiesce``, called by ``handle.fail``: cancel, deadline, errors)
  returns once every selected posted xfer reached DONE or ERR; it polls them itself
  under the lock, so it works on any thread (the poll thread included) and after the
  poll thread stopped. Releasing an active NIXL xfer does not stop it (UCX may go on
  writing after the release), so we never release one before it settles. Past
  ``QUIESCE_BOUND`` seconds the connection to that peer is broken (``_break``: remote
  agent removed, xfers released), its transfers fail, and a warning is logged. That
  does not stop UCX (measured: a released read lands in full once its stopped peer
  resumes), which is why reads land in a buffer of ours (:mod:`.nixl_landing`): a
  broken read's buffer is quarantined, and only ``_land``, under the handle's
  ``data_lock`` while it is active, writes the KV blocks. A broken *write* can still
  reach the peer's blocks late; the peer never got its notify for them.
- An ``ERR`` state marks the peer dead (``_kill``: nothing more is posted) and fails
  its transfers; a peer that just goes silent is caught by the Agent's deadline
  watchdog. A NIXL refusal to build an xfer fails that request only.
- A dead peer is retired (``_retire``) once none of its xfers is posted any more: its
  descriptor list is released and its remote agent removed.
- A write's messages (its notify; a stream's layer notes and finish note) are sent with
  ``send_notif`` once every chunk they announce has completed (the queue holds them
  back until then: NIXL keeps no order between a notification and earlier xfers).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from ..errors import PeerUnreachable, TransferFailed
from ..handle import TransferHandle
from ..heads import HeadRange, Segments
from ..logs import get_logger
from ..memory import RegisteredMemory
from ..plan import Chunk, Message
from ..scheduler import ChunkQueue
from .base import BackendPeer
from .nixl_descriptors import chunk_indices
from .nixl_landing import Landing, LandingPool, landing_order

log = get_logger("kvxfer.nixl")

NOTIFY_PREFIX = b"KVXN"  # marks NIXL notifications that carry a kvxfer write's notify
IDLE_POLL = 0.002  # seconds between polls while nothing is in flight
QUIESCE_BOUND = 1.5  # seconds quiesce waits for posted xfers before breaking the link
Key = tuple[int, int]  # (request id, chunk index)
Failures = list[tuple[TransferHandle, BaseException]]


class NixlPeer(BackendPeer):
    """A remote NIXL agent: its prepared descriptor list and our transfers to it.

    Every field is changed only under the backend's lock.
    """

    def __init__(self, name: str, nixl_name: str, metadata: bytes, dlist: Any,
                 num_blocks: int, max_inflight: int, piece_bytes: int, local_dlist: Any = None,
                 pieces: int = 1, local_heads: Optional[HeadRange] = None) -> None:
        self.name = name
        self.nixl_name = nixl_name
        self.metadata = metadata  # the backend metadata it was connected with
        self.dlist = dlist  # prepared remote descriptors; None once released
        # A peer of another TP shard: our descriptors of the heads it shares (None: the
        # backend's whole-block list) and the pieces per block both lists cut blocks into.
        self.local_dlist = local_dlist
        self.pieces = pieces
        self.piece_bytes = piece_bytes  # bytes of one piece (a whole block when pieces == 1)
        self.local_heads = local_heads  # our heads those pieces hold (None: whole blocks)
        # Reads of small pieces over-read (nixl_descriptors.over_reads): the peer's
        # whole-block list, the bytes of one of its blocks, and where the heads we
        # share lie in one. Set by over_read before the peer is used; None: per piece.
        self.read_dlist: Any = None
        self.read_block_bytes = 0
        self.picked: Optional[Segments] = None
        self.num_blocks = num_blocks
        self.queue = ChunkQueue(max_inflight, messages_after_finish=True)
        self.xfers: dict[Key, Any] = {}  # posted NIXL xfers, released once settled
        self.landings: dict[Key, Landing] = {}  # where posted reads land (nixl_landing)
        self.dead: Optional[BaseException] = None  # set once: nothing more is posted
        # Checksums (nixl_checksums): on for this connection (set by connect, before any
        # transfer); the peer's heads our pieces pair with (None: whole blocks); reads
        # landed and waiting for the owner's sum: key -> (handle, chunk, landing, our
        # sum, bytes); sums of posted write chunks, sent once DONE; set by the poll
        # thread when the peer acknowledged our introduction.
        self.checksum = False
        self.remote_heads: Optional[HeadRange] = None
        self.verifying: dict[Key, tuple] = {}
        self.sums: dict[Key, int] = {}
        self.introduced = threading.Event()

    @property
    def alive(self) -> bool:
        return self.dead is None

    def over_read(self, read_dlist: Any, block_bytes: int, picked: Segments) -> None:
        """Read this peer's whole blocks (``read_dlist``, ``block_bytes`` each) and pick
        the pieces ``picked`` of each while unpacking, instead of one descriptor each."""
        self.read_dlist, self.read_block_bytes, self.picked = read_dlist, block_bytes, picked

    def read_shape(self) -> tuple[Any, int, int]:
        """(remote list, pieces per block, bytes per piece) a read of this peer posts."""
        if self.read_dlist is not None:
            return self.read_dlist, 1, self.read_block_bytes
        return self.dlist, self.pieces, self.piece_bytes

    def read_bytes(self, chunk: Chunk, parts: int) -> int:
        """Bytes a read of ``chunk`` lands (the peer's whole blocks when it over-reads)."""
        _, pieces, piece_bytes = self.read_shape()
        return len(chunk.layers) * parts * pieces * chunk.num_blocks * piece_bytes

    @property
    def read_heads(self) -> Optional[HeadRange]:
        """The peer's heads a read's landing holds (None: its whole blocks)."""
        return None if self.read_dlist is not None else self.remote_heads


class NixlPeerLinks:
    """Posting, polling, settling and retiring xfers on :class:`NixlPeer` connections.

    A mixin of :class:`~kvxfer.backends.nixl.NixlBackend`, which owns the attributes
    below (set in its ``__init__`` and ``start``). ``_settle`` takes ``_cond`` itself and
    ``_fail_all`` runs outside it; every other method expects the caller to hold it.
    """

    _cond: threading.Condition  # guards every NIXL call and every peer
    _agent: Any  # the NIXL agent; None once closed
    _memory: Optional[RegisteredMemory]
    _local: Any  # prepared local descriptor list
    _landings: LandingPool  # where reads land before we fill the blocks
    _peers: list[NixlPeer]  # live ones, and dead ones until retired
    # from NixlChecksums (nixl_checksums), mixed in beside this class
    _verify_read: Callable[..., None]
    _drop_verifying: Callable[[NixlPeer, Callable[[Key], bool]], None]
    _source_sum: Callable[[NixlPeer, TransferHandle, Chunk], int]
    _send_sum: Callable[[NixlPeer, TransferHandle, Chunk, int], None]

    # ------------------------------------------------------------- settling
    def _settle(self, peer: NixlPeer, mine: Callable[[Key], bool]) -> None:
        """Poll ``peer``'s posted xfers that ``mine(key)`` selects until each settled
        (DONE or ERR); past QUIESCE_BOUND, break the connection. Any thread, unlocked."""
        limit = time.monotonic() + QUIESCE_BOUND
        events: list[tuple] = []
        failures: Failures = []
        while True:
            with self._cond:
                for key in [k for k in peer.xfers if mine(k)]:
                    self._check(peer, key, events)
                if not any(mine(k) for k in peer.xfers):
                    break
                if time.monotonic() >= limit:
                    log.warning("NIXL transfers to %r did not settle within %.1f s; "
                                "breaking the connection", peer.name, QUIESCE_BOUND)
                    failures = self._break(peer)
                    break
                self._cond.wait(IDLE_POLL)
        for fn, *args in events:  # reads that landed: their buffers go back (their
            if fn in (self._land, self._verify_read):  # handles are failing: nothing
                fn(*args)  # is placed)
        self._fail_all(failures)

    def _break(self, peer: NixlPeer) -> Failures:
        """End everything posted to ``peer``: invalidate its remote agent (NIXL then
        refuses its xfers), release them (UCX cancels their requests and closes the
        endpoint once the last goes). Caller holds the lock."""
        failures = self._kill(peer, PeerUnreachable(
            f"NIXL transfers to {peer.name!r} did not finish within {QUIESCE_BOUND} s "
            "after their transfer failed; the connection was broken"))
        self._remove_remote(peer.nixl_name)
        for key, xfer in list(peer.xfers.items()):
            self._release_xfer(xfer)
            peer.queue.finish(*key)
            peer.sums.pop(key, None)
            landing = peer.landings.pop(key, None)
            if landing is not None:  # UCX may still write it: never again ours to use
                self._landings.quarantine(landing)
        peer.xfers.clear()
        self._cond.notify_all()
        return failures

    def _kill(self, peer: NixlPeer, exc: BaseException) -> Failures:
        """Mark ``peer`` dead (nothing more is posted); returns its transfers to fail,
        outside the lock. Posted xfers stay until they settle."""
        if peer.dead is None:
            peer.dead = exc
        self._cond.notify_all()
        return [(h, peer.dead) for h in peer.queue.handles() if h.active]

    def _retire(self, peer: NixlPeer) -> None:
        """Free a dead peer whose xfers all settled; caller holds the lock."""
        if peer.xfers or peer.dlist is None:
            return
        try:
            peer.dlist.release()
        except Exception as exc:  # noqa: BLE001
            log.debug("releasing NIXL descriptors of %r: %s", peer.name, exc)
        peer.dlist = None
        for prepared in (peer.local_dlist, peer.read_dlist):
            if prepared is not None:
                try:
                    prepared.release()
                except Exception as exc:  # noqa: BLE001
                    log.debug("releasing NIXL descriptors for %r: %s", peer.name, exc)
        peer.local_dlist = peer.read_dlist = None
        peer.queue.clear()
        self._drop_verifying(peer, lambda key: True)
        peer.sums.clear()
        self._remove_remote(peer.nixl_name)
        if peer in self._peers:
            self._peers.remove(peer)

    @staticmethod
    def _fail_all(failures: Failures) -> None:
        for handle, exc in failures:
            handle.fail(exc)

    def _release_xfer(self, xfer: Any) -> None:
        try:
            self._agent.release_xfer_handle(xfer)
        except Exception as exc:  # noqa: BLE001 - an active transfer may refuse to go
            log.debug("releasing a NIXL transfer: %s", exc)

    def _state(self, xfer: Any) -> Optional[str]:
        """An xfer's state, None when NIXL cannot tell. Locked."""
        try:
            return self._agent.check_xfer_state(xfer)
        except Exception as exc:  # noqa: BLE001
            log.debug("checking a NIXL transfer: %s", exc)
            return None

    def _remove_remote(self, nixl_name: str) -> None:
        try:
            self._agent.remove_remote_agent(nixl_name)
        except Exception as exc:  # noqa: BLE001 - NIXL drops a disconnected one itself
            log.debug("removing NIXL peer %r: %s", nixl_name, exc)

    # ------------------------------------------------------------- posting
    def _check(self, peer: NixlPeer, key: Key, events: list[tuple]) -> None:
        """Poll one posted xfer; once settled, release it and free its slot. Locked."""
        xfer = peer.xfers[key]
        try:
            state = self._agent.check_xfer_state(xfer)
        except Exception as exc:  # noqa: BLE001
            log.debug("checking a NIXL transfer to %r: %s", peer.name, exc)
            state = "ERR"
        if state == "PROC":
            return
        del peer.xfers[key]
        self._release_xfer(xfer)
        landing = peer.landings.pop(key, None)
        self._cond.notify_all()  # quiescers wait for this
        posted = peer.queue.finish(*key)
        handle, chunk = posted if posted is not None else (None, None)
        value = peer.sums.pop(key, None)
        if handle is None or not handle.active or state == "ERR":
            if landing is not None:  # settled: nothing writes it any more
                self._landings.give(landing)
            if handle is not None and handle.active:  # ERR: the endpoint's, the peer gone
                err = PeerUnreachable(f"NIXL transfer to {peer.name!r} failed (chunk "
                                      f"{chunk.index} of {handle.op} #{handle.request_id})")
                events.append((self._fail_all, self._kill(peer, err)))
            return
        if landing is not None:
            if peer.checksum:  # placed only once the owner's sum matches
                events.append((self._verify_read, peer, handle, chunk, landing, key,
                               peer.read_bytes(chunk, self._parts())))
            else:
                events.append((self._land, peer, handle, chunk, landing))
            return
        if value is not None:  # a write's sum goes before any note announcing the chunk
            try:
                self._send_sum(peer, handle, chunk, value)
            except Exception as exc:  # noqa: BLE001
                events.append((handle.fail, PeerUnreachable(
                    f"NIXL could not send a checksum to {peer.name!r}: {exc}")))
                return
        events.append((handle.chunk_done, chunk))

    def _parts(self) -> int:
        assert self._memory is not None
        return self._memory.num_parts

    def _land(self, peer: NixlPeer, handle: TransferHandle, chunk: Chunk,
              landing: Landing) -> None:
        """Fill a read chunk's blocks from where NIXL landed it: under the handle's
        ``data_lock`` and only while it is active. Unlocked (not under ``_cond``)."""
        memory = self._memory
        assert memory is not None
        try:
            with handle.data_lock:
                placed = handle.active
                if placed and peer.picked is not None:  # whole blocks: pick our heads
                    memory.unpack_picked(chunk.layers, chunk.local_runs, landing.tensor,
                                         peer.local_heads, peer.read_block_bytes, peer.picked)
                elif placed:
                    memory.unpack_from(chunk.layers, chunk.local_runs, landing.tensor,
                                       peer.local_heads)
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the link's
            handle.fail(TransferFailed(
                f"placing chunk {chunk.index} of read #{handle.request_id}: {exc}",
                peer=peer.name, request_id=handle.request_id, cause=exc))
            placed = False
        finally:
            with self._cond:
                self._landings.give(landing)
        if placed:
            handle.chunk_done(chunk)

    def _post_ready(self, peer: NixlPeer, events: list[tuple]) -> None:
        """Post what the queue lets go now (active handles only). Locked."""
        while peer.alive:
            nxt = peer.queue.next()
            if nxt is None:
                return
            handle, chunk = nxt
            key = (handle.request_id, chunk.index)
            if isinstance(chunk, Message):  # its chunks have all completed
                peer.queue.finish(*key)
                try:
                    self._agent.send_notif(peer.nixl_name, NOTIFY_PREFIX + handle.note(chunk))
                except Exception as exc:  # noqa: BLE001
                    events.append((handle.fail, PeerUnreachable(
                        f"NIXL could not send a notification to {peer.name!r}: {exc}")))
                    continue
                events.append((handle.message_done,))
                continue
            memory = self._memory
            assert memory is not None
            landing = None
            try:
                parts = memory.num_parts
                if handle.op == "read":  # into a landing buffer, placed by _land
                    remote_list, pieces, piece_bytes = peer.read_shape()
                    remote = chunk_indices(chunk, parts, peer.num_blocks, 1, pieces)
                    landing = self._landings.take(piece_bytes, len(remote))
                    local_list = landing.dlist
                    local = landing_order(len(chunk.layers) * parts, pieces, chunk.num_blocks)
                else:  # a write reads our blocks where they are, piece by piece
                    remote_list, pieces = peer.dlist, peer.pieces
                    remote = chunk_indices(chunk, parts, peer.num_blocks, 1, pieces)
                    local_list = self._local if peer.local_dlist is None else peer.local_dlist
                    local = chunk_indices(chunk, parts, memory.num_blocks, 0, pieces)
                    if peer.checksum:  # the source as posted (its event completed)
                        peer.sums[key] = self._source_sum(peer, handle, chunk)
                xfer = self._agent.make_prepped_xfer(
                    "READ" if handle.op == "read" else "WRITE", local_list, local,
                    remote_list, remote)
            except Exception as exc:  # noqa: BLE001 - this request's blocks, not the link
                if landing is not None:
                    self._landings.give(landing)
                peer.sums.pop(key, None)
                peer.queue.finish(*key)
                events.append((handle.fail, TransferFailed(
                    f"NIXL refused chunk {chunk.index} of {handle.op} #{handle.request_id}: "
                    f"{exc}", peer=peer.name, request_id=handle.request_id, cause=exc)))
                continue
            peer.xfers[key] = xfer
            if landing is not None:
                peer.landings[key] = landing
            try:
                state = self._agent.transfer(xfer)
            except Exception as exc:  # noqa: BLE001
                log.debug("posting to %r: %s", peer.name, exc)
                state = "ERR"
            if state == "ERR":  # stays in xfers until it settles (at once, normally)
                err = PeerUnreachable(f"NIXL refused to post chunk {chunk.index} to "
                                      f"{peer.name!r}")
                events.append((self._fail_all, self._kill(peer, err)))
