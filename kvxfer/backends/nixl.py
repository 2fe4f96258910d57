"""NIXL backend: one-sided reads and writes straight between registered KV regions.

Theory of operation
-------------------
``start`` registers each distinct storage behind the KV cache with a NIXL agent (its
UCX plugin) once and prepares the local descriptor list once: one strided row per
region, indexed by flat block number ``r * num_blocks + b`` (see
:mod:`.nixl_descriptors`). ``backend_metadata()`` carries the NIXL agent metadata plus
our region table, so ``connect`` prepares the peer's list the same way: O(regions),
whatever the block count. ``connect`` then makes the NIXL connection and reads the
peer's first block into a small private scratch buffer (never engine memory), waiting
for it: the UCX endpoint is wired up and proven before the first transfer.

One owned poll thread, per peer connection (a :class:`ChunkQueue`)::

    submit -> queue (round-robin, <= max_inflight posted) -> post xfer -> poll state
                                                               |        DONE: chunk_done
       handle no longer active: post nothing more  ------------+        ERR:  peer dead
       its posted xfers stay posted, polled until DONE or ERR, only then released

Posting, polling, ``quiesce``'s settling and a dead peer's retirement are the
per-connection logic of :mod:`.nixl_peers` (mixed in as :class:`NixlPeerLinks`); this
module holds registration, connecting, ``submit``, the poll loop and notifications.

- A remote block id past the peer's ``num_blocks`` fails that handle only, before
  anything is posted.
- A write's messages (its notify, a stream's layer and finish notes), each sent as a
  NIXL notification once the chunks it announces completed (see :mod:`.nixl_peers`),
  are handed to the peer's notify sink there by its poll thread; when the sink refuses
  (its unread backlog full), the message is held, and the notes after it queue behind
  it in order, until the engine reads its notifications. (NIXL's queue is still
  drained: checksum notifications must not wait behind unread notes.)
- ``checksum=True`` (either side's metadata asks): reads are placed only once the
  owner's xxh3-64 of the same blocks matches the landed bytes; write chunks carry the
  writer's sum, checked by the receiver after they landed (:mod:`.nixl_checksums`).
- NIXL keys remote agents by name. ``connect`` to a name we already know (a restarted
  peer) first ``disconnect``s the old connection: its transfers fail, their xfers
  settle, its descriptor list is released and its remote agent removed; only then is
  the new metadata loaded.
- ``close`` drops every reference to the NIXL agent, the handles it gave out included
  (each keeps the C++ agent alive, released or not), so the agent, its UCX worker and
  sockets go at once, not at the next cyclic GC. It matters beyond this process: NIXL's
  ``remove_remote_agent`` leaves the remover's TCP connection open for as long as the
  removed agent lives, so a peer holding its closed incarnations makes us hold sockets.
"""

from __future__ import annotations

import importlib
import json
import struct
import threading
import time
from collections import deque
from typing import Any, Optional

import numpy as np
import torch

from ..errors import (AgentClosed, BlockOutOfRange, LayoutMismatch, PeerUnreachable,
                      RemoteProtocolError)
from ..handle import TransferHandle
from ..heads import exchange_heads
from ..logs import get_logger
from ..memory import RegisteredMemory
from .base import Backend, BackendConfig, BackendPeer, NotifySink, PeerInfo
from .nixl_checksums import PREFIXES, NixlChecksums
from .nixl_descriptors import head_pieces, over_reads, region_table, strided_rows
from .nixl_landing import LandingPool
# QUIESCE_BOUND lives (and is read, so patched) in .nixl_peers, next to _settle.
from .nixl_peers import IDLE_POLL, NOTIFY_PREFIX, NixlPeer, NixlPeerLinks

log = get_logger("kvxfer.nixl")

MAX_INDEX = (1 << 31) - 1  # NIXL takes descriptor indices as C ints
_LEN = struct.Struct("!I")
# nixl-cu12 and nixl-cu13 ship the same API under their own names; the ``nixl`` meta
# package re-exports whichever matches the machine's CUDA.
NIXL_MODULES = ("nixl_cu12._api", "nixl._api", "nixl_cu13._api")


def _import_nixl() -> Any:
    errors = []
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("no NIXL Python API found (" + "; ".join(errors) + ")")


_nixl = _import_nixl()
nixl_agent, nixl_agent_config = _nixl.nixl_agent, _nixl.nixl_agent_config


class NixlBackend(NixlChecksums, NixlPeerLinks, Backend):
    """kvxfer over NIXL (``pip install 'kvxfer[nixl]'``); see the module docstring."""

    name = "nixl"
    one_sided = True

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        super().__init__(agent_name, listen, config)
        self._cond = threading.Condition()  # guards every NIXL call and every peer
        self._closed = False
        self._agent: Any = None
        self._memory: Optional[RegisteredMemory] = None
        self._notify: Optional[NotifySink] = None
        # Notifications the agent refused (its unread backlog is full), oldest first;
        # poll thread only. While any wait, the rest stay queued inside NIXL.
        self._held: deque[tuple[str, bytes]] = deque()
        self._mem_type = "DRAM"
        self._device = 0
        self._reg: Any = None  # registered descriptor list, None once deregistered
        self._local: Any = None  # prepared local descriptor list
        # (tensor, registration, {bytes: prepared list}): connect's warm-up read
        self._scratch: Any = None
        self._peers: list[NixlPeer] = []  # live ones, and dead ones until retired
        self._connecting: dict[str, threading.Lock] = {}  # one connect per name at a time
        self._thread: Optional[threading.Thread] = None
        self._stuck: list[Any] = []  # warm-up xfers that never settled (into scratch only)
        self._landings: Any = None  # LandingPool: where reads land (nixl_landing)
        self._init_checksums()  # reply links and counters (nixl_checksums)

    # ------------------------------------------------------------- lifecycle
    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None:
        if len(memory.layout.regions) * memory.num_blocks > MAX_INDEX:
            raise LayoutMismatch("NIXL indexes descriptors with C ints: at most 2**31 "
                                 "(region, block) pairs", field="num_blocks")
        self._memory, self._notify = memory, notify
        if not memory.is_host:
            self._mem_type, self._device = "VRAM", memory.layout.device.index or 0
        # NIXL's own progress thread spins (one core per agent); our poll thread progresses
        # the agent instead, through check_xfer_state and get_new_notifs.
        self._agent = nixl_agent(self.agent_name, nixl_agent_config(enable_prog_thread=False,
                                                                    backends=["UCX"]))
        storages: dict[int, tuple[int, int, int, str]] = {}
        for region in memory.layout.regions:
            storage = region.view.untyped_storage()
            storages[storage.data_ptr()] = (storage.data_ptr(), storage.nbytes(), self._device, "")
        self._reg = self._agent.register_memory(list(storages.values()), self._mem_type)
        self._local = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", strided_rows(region_table(memory), self._device), self._mem_type)
        self._landings = LandingPool(self._agent, self._mem_type, self._device,
                                     memory.layout.device, self.config.chunk_bytes)
        scratch = torch.empty(memory.layout.regions[0].block_bytes, dtype=torch.uint8)
        self._scratch = (scratch, self._agent.register_memory(
            [(scratch.data_ptr(), scratch.nbytes, 0, "")], "DRAM"), {})
        self._thread = threading.Thread(target=self._poll_loop, daemon=True,
                                        name=f"kvxfer-nixl-poll[{self.agent_name}]")
        self._thread.start()

    def _scratch_list(self, nbytes: int) -> Any:
        """A prepared one-row list of the scratch buffer's first ``nbytes``. Locked."""
        scratch, _, lists = self._scratch
        if nbytes not in lists:
            row = [[scratch.data_ptr(), min(nbytes, scratch.nbytes), 0, scratch.nbytes, 1]]
            lists[nbytes] = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT",
                                                        np.asarray(row, np.uint64), "DRAM")
        return lists[nbytes]

    @property
    def registered_storages(self) -> int:
        """How many memory segments are registered with NIXL now (0 after close)."""
        return 0 if self._reg is None else self._reg.descCount()

    def address(self) -> str:
        return f"nixl:{self.agent_name}"  # NIXL connects through backend_metadata

    def backend_metadata(self) -> bytes:
        assert self._memory is not None, "start() first"
        head = json.dumps({"regions": region_table(self._memory), "mem_type": self._mem_type,
                           "device": self._device,
                           "checksum": self.config.checksum}).encode()
        with self._cond:
            return _LEN.pack(len(head)) + head + self._agent.get_agent_metadata()

    def connect(self, peer: PeerInfo) -> NixlPeer:
        memory = self._memory
        assert memory is not None, "start() first"
        memory.layout.descriptor.check_compatible(peer.descriptor)
        try:
            (n,) = _LEN.unpack_from(peer.backend_metadata)
            head = json.loads(peer.backend_metadata[4:4 + n])
            nixl_md = peer.backend_metadata[4 + n:]
            table, mem_type, device = head["regions"], head["mem_type"], int(head["device"])
            checksum = self.config.checksum or bool(head.get("checksum", False))
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise RemoteProtocolError(f"malformed NIXL metadata from {peer.name!r}: {exc}") \
                from exc
        if len(table) != len(memory.layout.regions) or \
                any(r[2] != peer.descriptor.block_bytes for r in table):
            raise LayoutMismatch(f"peer {peer.name!r}'s regions disagree with its layout",
                                 field="block_bytes")
        if any(r[3] != peer.descriptor.num_blocks for r in table):
            raise LayoutMismatch(f"peer {peer.name!r}'s regions disagree with its layout",
                                 field="num_blocks")
        with self._cond:
            lock = self._connecting.setdefault(peer.name, threading.Lock())
        with lock:  # NIXL keys remote agents by name: one connect per name at a time
            with self._cond:
                old = [p for p in self._peers if p.name == peer.name and p.dlist is not None]
                same = [p for p in old if p.alive and p.metadata == peer.backend_metadata]
                if same:
                    return same[0]
            for p in old:  # a restarted peer: its predecessor goes first, wholly
                self.disconnect(p, PeerUnreachable(
                    f"peer {peer.name!r} was connected again (restarted); this connection "
                    "to its predecessor is closed"))
            conn = self._load_peer(peer, nixl_md, table, mem_type, device, checksum)
            if checksum:
                try:
                    self._introduce(conn)  # so that it can answer our checksum requests
                except Exception as exc:
                    self.disconnect(conn, exc)
                    raise
            return conn

    def _load_peer(self, peer: PeerInfo, nixl_md: bytes, table: list, mem_type: str,
                   device: int, checksum: bool = False) -> NixlPeer:
        assert self._memory is not None
        ours, theirs = head_pieces(self._memory, peer.descriptor)
        # Our heads those pieces hold, as unpack_from takes them (a read lands packed).
        local_heads, remote_heads = (None, None) if ours is None else \
            exchange_heads(self._memory.layout.descriptor, peer.descriptor).explicit()
        assert ours is None or self._memory.segments(local_heads) == ours
        if ours is not None and len(table) * ours.count * \
                max(self._memory.num_blocks, peer.descriptor.num_blocks) > MAX_INDEX:
            raise LayoutMismatch("NIXL indexes descriptors with C ints: at most 2**31 "
                                 "(region, piece, block) triples", field="num_blocks")
        with self._cond:
            if self._closed:
                raise AgentClosed("agent closed")
            nixl_name = local_dlist = read_dlist = None
            try:
                nixl_name = self._agent.add_remote_agent(nixl_md)
                if isinstance(nixl_name, bytes):
                    nixl_name = nixl_name.decode()
                dlist = self._agent.prep_xfer_dlist(nixl_name, strided_rows(table, device, theirs),
                                                    mem_type)
                if ours is not None:
                    local_dlist = self._agent.prep_xfer_dlist(
                        "NIXL_INIT_AGENT", strided_rows(region_table(self._memory), self._device,
                                                        ours), self._mem_type)
                if over_reads(self._memory, theirs, table[0][2]):  # read whole blocks
                    read_dlist = self._agent.prep_xfer_dlist(
                        nixl_name, strided_rows(table, device), mem_type)
                self._agent.make_connection(nixl_name)
                self._warm_up(nixl_name, dlist, table[0][2] if theirs is None else theirs.nbytes)
            except Exception as exc:  # noqa: BLE001 - nixl raises its own types
                for prepared in (local_dlist, read_dlist):
                    if prepared is not None:
                        prepared.release()
                if nixl_name is not None:
                    self._remove_remote(nixl_name)
                raise PeerUnreachable(f"NIXL cannot reach peer {peer.name!r}: {exc}") from exc
            conn = NixlPeer(peer.name, nixl_name, peer.backend_metadata, dlist,
                             peer.descriptor.num_blocks, self.config.max_inflight,
                             self._memory.block_bytes if ours is None else ours.nbytes, local_dlist,
                             1 if ours is None else ours.count, local_heads)
            conn.checksum, conn.remote_heads = checksum, remote_heads
            # Our connection to it now carries answers to its checksum requests too.
            self._replies.pop(nixl_name, None)
            if read_dlist is not None:
                conn.over_read(read_dlist, table[0][2], theirs)
            self._peers.append(conn)
            return conn

    def _warm_up(self, nixl_name: str, dlist: Any, nbytes: int) -> None:
        """Read the peer's first descriptor (``nbytes``: a block, or the piece of one we
        share with a peer of another TP shard, never more than our block) into our
        scratch buffer and wait: UCX wires the endpoint up on its first operation, which
        then is not a transfer's. Locked."""
        xfer = self._agent.make_prepped_xfer("READ", self._scratch_list(nbytes), [0], dlist, [0])
        state = self._agent.transfer(xfer)
        limit = time.monotonic() + self.config.connect_timeout
        while state == "PROC" and time.monotonic() < limit:
            state = self._agent.check_xfer_state(xfer)
        if state == "PROC":  # lands in scratch only, which is never freed before close
            self._stuck.append(xfer)
        else:
            self._release_xfer(xfer)
        if state != "DONE":
            raise PeerUnreachable(f"a first read of {nixl_name!r} did not complete ({state})")

    def disconnect(self, peer: BackendPeer, why: BaseException) -> None:
        assert isinstance(peer, NixlPeer)
        with self._cond:
            failures = self._kill(peer, why)
        self._fail_all(failures)  # each waits (bounded) for its posted xfers
        self._settle(peer, lambda key: True)  # and xfers of handles failed elsewhere
        with self._cond:
            self._retire(peer)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._cond:
            peers = list(self._peers)
            failures = [f for p in peers for f in self._kill(p, AgentClosed("agent closed"))]
        self._fail_all(failures)
        for peer in peers:
            self._settle(peer, lambda key: True)
        with self._cond:
            for peer in peers:
                self._retire(peer)
            if self._agent is not None:
                self._free_agent()

    def _free_agent(self) -> None:
        """Release what we prepared and registered, then drop every reference to the NIXL
        agent. Each handle NIXL hands out (prepared list or xfer, released or not) keeps
        its C++ agent alive, and the Agent <-> backend cycle would leave it to the cyclic
        GC: its UCX worker, listening sockets and connections (and the peers' ends of
        them) would linger until a collection. Locked."""
        try:
            for xfer in list(self._stuck):  # warm-ups that settled since: free them now
                if self._state(xfer) not in ("PROC", None):
                    self._stuck.remove(xfer)
                    self._release_xfer(xfer)
            self._forget_replies()
            self._local.release()
            problem = self._landings.close()
            if problem:
                log.debug("%s", problem)
            self._agent.deregister_memory(self._reg)
            if not self._stuck:  # one still in flight may land in scratch: keep it
                for scratch_list in self._scratch[2].values():
                    scratch_list.release()
                self._agent.deregister_memory(self._scratch[1])
        finally:
            self._local = self._reg = self._agent = None
            if not self._stuck:
                self._scratch = None

    # ------------------------------------------------------------- requests
    def submit(self, peer: BackendPeer, handle: TransferHandle) -> None:
        assert isinstance(peer, NixlPeer)
        for chunk in handle.chunks:
            for _, start, count in chunk.runs:
                if start + count > peer.num_blocks:
                    handle.fail(BlockOutOfRange(
                        f"remote blocks [{start}, {start + count}) outside peer {peer.name!r}'s "
                        f"registered [0, {peer.num_blocks})"))
                    return
        with self._cond:
            dead = peer.dead or (AgentClosed("agent closed") if self._closed else None)
            if dead is None:
                handle.kick = self._kick
                peer.queue.push(handle, [*handle.chunks, *handle.messages])
                self._cond.notify_all()
                return
        handle.fail(PeerUnreachable(f"NIXL peer {peer.name!r} is down: {dead}"))

    def _kick(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def quiesce(self, handle: TransferHandle) -> None:
        rid = handle.request_id
        with self._cond:
            peers = [p for p in self._peers if any(k[0] == rid for k in p.xfers)]
            for p in self._peers:  # landed reads waiting for a sum: nothing posted
                self._drop_verifying(p, lambda key: key[0] == rid)
        for peer in peers:
            self._settle(peer, lambda key: key[0] == rid)

    # ------------------------------------------------------------ poll thread
    def _poll_loop(self) -> None:
        while True:
            try:
                with self._cond:
                    if self._closed:
                        return
                    # Poll hard only while xfers are posted or a CUDA event is pending;
                    # else sleep (a submit or a signalled layer wakes us at once).
                    busy = any(p.xfers or p.queue.waiting for p in self._peers)
                    if not busy:
                        self._cond.wait(IDLE_POLL)
                    events = self._step()
                for fn, *args in events:
                    fn(*args)
                self._deliver_notifications()
            except Exception:  # noqa: BLE001 - one bad step must not end the thread
                log.exception("NIXL poll step of %r failed; going on", self.agent_name)
                busy = False
                time.sleep(IDLE_POLL)
            if busy:
                time.sleep(0)

    def _step(self) -> list[tuple]:
        """Poll, post and collect notifications once; returns callbacks to run unlocked."""
        events: list[tuple] = []
        for peer in list(self._peers):
            try:
                for key in list(peer.xfers):
                    self._check(peer, key, events)
                if peer.alive:
                    self._post_ready(peer, events)
                elif not peer.xfers and peer.dlist is not None and not self._connecting_now(peer):
                    self._retire(peer)  # died by itself (ERR): free it once all settled
            except Exception as exc:  # noqa: BLE001 - NIXL errors end that peer only
                err = PeerUnreachable(f"NIXL transfer to {peer.name!r} failed: {exc}")
                events.append((self._fail_all, self._kill(peer, err)))
        # Drained even while notes are held (they queue behind the held ones, in order):
        # checksum answers must not wait for the engine to read its notifications.
        for nixl_name, messages in self._agent.get_new_notifs().items():
            name = nixl_name.decode() if isinstance(nixl_name, bytes) else nixl_name
            for msg in messages:
                if msg.startswith(NOTIFY_PREFIX):
                    self._held.append((name, bytes(msg[len(NOTIFY_PREFIX):])))
                elif msg[:len(NOTIFY_PREFIX)] in PREFIXES:
                    self._on_checksum_note(name, bytes(msg), events)
        return events

    def _connecting_now(self, peer: NixlPeer) -> bool:
        lock = self._connecting.get(peer.name)
        return lock is not None and lock.locked()

    def _deliver_notifications(self) -> None:
        """Hand held notifications to the agent in order until it refuses one."""
        while self._held and self._notify is not None:
            try:
                if not self._notify(*self._held[0]):
                    return
            except RemoteProtocolError as exc:  # a malformed note: drop it, keep the rest
                log.warning("dropping a malformed notification from %r: %s",
                            self._held[0][0], exc)
            self._held.popleft()
