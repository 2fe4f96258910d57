"""NIXL backend: one-sided reads and writes straight between registered KV regions.

Theory of operation
-------------------
``start`` registers each distinct storage behind the KV cache with a NIXL agent (its
UCX plugin) once, and prepares the local descriptor list once: one descriptor per
(region, block), region-major, so descriptor ``r * num_blocks + b`` is block ``b`` of
region ``r`` (regions in layout order: layer-major, then part)::

    descriptor index   0 .. NB-1      NB .. 2NB-1     ...   (R-1)NB .. R*NB-1
    region             L0/K           L0/V            ...   L(n-1)/V
    address            base_r + b * block_stride_r,  length block_bytes_r

``backend_metadata()`` carries the NIXL agent metadata plus our region table (base,
stride, block bytes, block count per region), so a peer prepares the same list for
our memory once, in ``connect``. A chunk (layers x runs) becomes one
``make_prepped_xfer`` over the matching local and remote indices; NIXL merges
descriptors contiguous on both sides, so a run of blocks in a dense region is one
operation. READ pulls the peer's blocks into ours; WRITE pushes. The peer's CPU is
not involved.

One owned poll thread posts chunks (at most ``max_inflight`` per peer, round-robin
across requests), polls ``check_xfer_state``, and reads NIXL notifications: a write's
``notify`` is sent with ``send_notif`` once every chunk of it completed (after the
data, on the same UCX endpoint) and handed to the peer's notify sink there (when the
sink refuses, its unread backlog full, the message is held and NIXL's queue is left
undrained until the engine reads its notifications: nothing is dropped). An ``ERR``
state fails the handle and marks the peer dead; a peer that just goes silent is caught
by the Agent's deadline watchdog. A remote block id past the peer's ``num_blocks`` is
refused before anything is posted. When a handle fails or is cancelled its in-flight
operations are released (NIXL cancels what it still can; an operation the NIC already
executes may still complete, which a one-sided transport cannot prevent).
"""

from __future__ import annotations

import importlib
import json
import logging
import struct
import threading
import time
from collections import deque
from typing import Any, Optional

import numpy as np

from ..errors import (AgentClosed, BlockOutOfRange, LayoutMismatch, PeerUnreachable,
                      RemoteProtocolError)
from ..handle import TransferHandle
from ..memory import RegisteredMemory
from ..plan import Chunk
from .base import Backend, BackendConfig, BackendPeer, NotifySink, PeerInfo

log = logging.getLogger("kvxfer.nixl")

NOTIFY_PREFIX = b"KVXN"  # marks NIXL notifications that carry a kvxfer write's notify
IDLE_POLL = 0.002  # seconds between notification polls while nothing is in flight
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


def _region_table(memory: RegisteredMemory) -> list[list[int]]:
    return [[r.base, r.block_stride, r.block_bytes, r.num_blocks] for r in memory.layout.regions]


def _descriptors(table: list[list[int]], device: int) -> np.ndarray:
    """Nx3 (address, length, device) rows: one per (region, block), region-major."""
    rows = [np.stack([base + stride * np.arange(n, dtype=np.uint64),
                      np.full(n, nbytes, dtype=np.uint64),
                      np.full(n, device, dtype=np.uint64)], axis=1)
            for base, stride, nbytes, n in table]
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.uint64)


def _indices(chunk: Chunk, parts: int, num_blocks: int, side: int) -> np.ndarray:
    """Descriptor indices of a chunk on one side (0: local runs, 1: remote runs)."""
    starts = [run[side] for run in chunk.runs]
    counts = [run[2] for run in chunk.runs]
    blocks = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])
    regions = [layer * parts + p for layer in chunk.layers for p in range(parts)]
    return (np.asarray(regions)[:, None] * num_blocks + blocks[None, :]).ravel().astype(np.int32)


class _NixlPeer(BackendPeer):
    """A remote NIXL agent: its prepared descriptor list and our requests to it."""

    def __init__(self, name: str, nixl_name: str, dlist: Any, num_blocks: int) -> None:
        self.name = name
        self.nixl_name = nixl_name
        self.dlist = dlist
        self.num_blocks = num_blocks
        self.queue: deque[list] = deque()  # [handle, chunks, next index]; round-robin
        self.inflight: list[tuple[Any, TransferHandle, Chunk]] = []  # (xfer, handle, chunk)
        self.left: dict[TransferHandle, int] = {}  # chunks of a handle not yet completed
        self.dead: Optional[BaseException] = None

    @property
    def alive(self) -> bool:
        return self.dead is None


class NixlBackend(Backend):
    """kvxfer over NIXL (``pip install 'kvxfer[nixl]'``); see the module docstring."""

    name = "nixl"
    one_sided = True

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        super().__init__(agent_name, listen, config)
        self._cond = threading.Condition()  # guards every NIXL call and the peers' queues
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
        self._peers: list[_NixlPeer] = []
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------- lifecycle
    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None:
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
            "NIXL_INIT_AGENT", _descriptors(_region_table(memory), self._device), self._mem_type)
        self._thread = threading.Thread(target=self._poll_loop, daemon=True,
                                        name=f"kvxfer-nixl-poll[{self.agent_name}]")
        self._thread.start()

    @property
    def registered_storages(self) -> int:
        """How many memory segments are registered with NIXL now (0 after close)."""
        return 0 if self._reg is None else self._reg.descCount()

    def address(self) -> str:
        return f"nixl:{self.agent_name}"  # NIXL connects through backend_metadata

    def backend_metadata(self) -> bytes:
        assert self._memory is not None, "start() first"
        head = json.dumps({"regions": _region_table(self._memory), "mem_type": self._mem_type,
                           "device": self._device}).encode()
        with self._cond:
            return _LEN.pack(len(head)) + head + self._agent.get_agent_metadata()

    def connect(self, peer: PeerInfo) -> _NixlPeer:
        memory = self._memory
        assert memory is not None, "start() first"
        memory.layout.descriptor.check_compatible(peer.descriptor)
        try:
            (n,) = _LEN.unpack_from(peer.backend_metadata)
            head = json.loads(peer.backend_metadata[4:4 + n])
            nixl_md = peer.backend_metadata[4 + n:]
            table, mem_type = head["regions"], head["mem_type"]
        except (struct.error, ValueError, KeyError) as exc:
            raise RemoteProtocolError(f"malformed NIXL metadata from {peer.name!r}: {exc}") \
                from exc
        ours = _region_table(memory)
        if [r[2] for r in table] != [r[2] for r in ours]:
            raise LayoutMismatch(f"peer {peer.name!r} has regions of other sizes than ours",
                                 field="block_bytes")
        if any(r[3] != peer.descriptor.num_blocks for r in table):
            raise LayoutMismatch(f"peer {peer.name!r}'s regions disagree with its layout",
                                 field="num_blocks")
        with self._cond:
            if self._closed:
                raise AgentClosed("agent closed")
            self._forget_peer(peer.name)
            try:
                nixl_name = self._agent.add_remote_agent(nixl_md)
                dlist = self._agent.prep_xfer_dlist(nixl_name, _descriptors(table, head["device"]),
                                                    mem_type)
            except Exception as exc:  # noqa: BLE001 - nixl raises its own types
                raise PeerUnreachable(f"NIXL cannot reach peer {peer.name!r}: {exc}") from exc
            conn = _NixlPeer(peer.name, nixl_name, dlist, peer.descriptor.num_blocks)
            self._peers.append(conn)
        return conn

    def _forget_peer(self, name: str) -> None:
        """Drop an earlier connection to ``name`` (re-added peer); caller holds the lock."""
        for old in [p for p in self._peers if p.name == name]:
            self._peers.remove(old)
            self._kill(old, PeerUnreachable(f"peer {name!r} was added again"))
            self._release_peer(old)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._cond:
            failed = [self._kill(p, AgentClosed("agent closed")) for p in self._peers]
            for peer in self._peers:
                self._release_peer(peer)
            self._peers.clear()
            if self._agent is not None:
                self._local.release()
                self._agent.deregister_memory(self._reg)
                self._reg = None
                self._agent = None  # the NIXL agent goes with its last reference
        for handles in failed:
            self._fail_all(handles)

    # ------------------------------------------------------------- requests
    def submit(self, peer: BackendPeer, handle: TransferHandle) -> None:
        assert isinstance(peer, _NixlPeer)
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
                peer.queue.append([handle, list(handle.chunks), 0])
                peer.left[handle] = len(handle.chunks)
                self._cond.notify_all()
                return
        handle.fail(PeerUnreachable(f"NIXL peer {peer.name!r} is down: {dead}"))

    def _kill(self, peer: _NixlPeer, exc: BaseException) -> list[tuple[TransferHandle, Any]]:
        """Mark ``peer`` dead; returns its handles to fail (outside the lock)."""
        if peer.dead is None:
            peer.dead = exc
        handles = list(peer.left)
        for xfer, _, _ in peer.inflight:
            self._release_xfer(xfer)
        peer.inflight.clear()
        peer.queue.clear()
        peer.left.clear()
        return [(h, exc) for h in handles]

    @staticmethod
    def _fail_all(failures: list[tuple[TransferHandle, Any]]) -> None:
        for handle, exc in failures:
            handle.fail(exc)

    def _release_xfer(self, xfer: Any) -> None:
        try:
            self._agent.release_xfer_handle(xfer)
        except Exception as exc:  # noqa: BLE001 - an active transfer may refuse to go
            log.debug("releasing a NIXL transfer: %s", exc)

    def _release_peer(self, peer: _NixlPeer) -> None:
        try:
            peer.dlist.release()
            self._agent.remove_remote_agent(peer.nixl_name)
        except Exception as exc:  # noqa: BLE001
            log.debug("removing NIXL peer %r: %s", peer.name, exc)

    # ------------------------------------------------------------ poll thread
    def _poll_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                busy = any(p.inflight or p.queue for p in self._peers)
                if not busy:
                    self._cond.wait(IDLE_POLL)
                events = self._step()
            for fn, *args in events:
                fn(*args)
            self._deliver_notifications()
            if busy:
                time.sleep(0)

    def _step(self) -> list[tuple]:
        """Post, poll and collect notifications once; returns callbacks to run unlocked."""
        events: list[tuple] = []
        for peer in list(self._peers):
            if peer.dead is None:
                try:
                    self._progress(peer, events)
                except Exception as exc:  # noqa: BLE001 - NIXL errors end the peer
                    err = PeerUnreachable(f"NIXL transfer to {peer.name!r} failed: {exc}")
                    events.append((self._fail_all, self._kill(peer, err)))
        if not self._held:
            for nixl_name, messages in self._agent.get_new_notifs().items():
                for msg in messages:
                    if msg.startswith(NOTIFY_PREFIX):
                        self._held.append((nixl_name, bytes(msg[len(NOTIFY_PREFIX):])))
        return events

    def _deliver_notifications(self) -> None:
        """Hand held notifications to the agent in order until it refuses one."""
        while self._held and self._notify is not None and self._notify(*self._held[0]):
            self._held.popleft()

    def _progress(self, peer: _NixlPeer, events: list[tuple]) -> None:
        still = []
        for xfer, handle, chunk in peer.inflight:
            state = "DONE" if not handle.active else self._agent.check_xfer_state(xfer)
            if state == "PROC":
                still.append((xfer, handle, chunk))
                continue
            self._release_xfer(xfer)
            if state == "ERR":
                raise PeerUnreachable(f"NIXL reported an error for chunk {chunk.index}")
            if handle.active:
                self._chunk_completed(peer, handle, chunk, events)
        peer.inflight = still
        for handle in [h for h in peer.left if not h.active]:
            del peer.left[handle]  # failed, cancelled or expired: post nothing more
        while peer.queue and len(peer.inflight) < self.config.max_inflight:
            entry = peer.queue.popleft()
            handle, chunks, i = entry
            if not handle.active:
                continue
            if not chunks:  # a write of no blocks: just the message
                peer.left.pop(handle, None)
                self._send_notify(peer, handle)
                events.append((handle.message_done,))
                continue
            entry[2] = i + 1
            if i + 1 < len(chunks):
                peer.queue.append(entry)
            self._post(peer, handle, chunks[i])

    def _post(self, peer: _NixlPeer, handle: TransferHandle, chunk: Chunk) -> None:
        memory = self._memory
        assert memory is not None
        op = "READ" if handle.op == "read" else "WRITE"
        xfer = self._agent.make_prepped_xfer(
            op, self._local, _indices(chunk, memory.num_parts, memory.num_blocks, 0),
            peer.dlist, _indices(chunk, memory.num_parts, peer.num_blocks, 1))
        peer.inflight.append((xfer, handle, chunk))
        if self._agent.transfer(xfer) == "ERR":
            raise PeerUnreachable(f"NIXL refused to post chunk {chunk.index}")

    def _chunk_completed(self, peer: _NixlPeer, handle: TransferHandle, chunk: Chunk,
                         events: list[tuple]) -> None:
        left = peer.left.get(handle, 0) - 1
        if left <= 0:
            peer.left.pop(handle, None)
            if handle.op == "write":
                self._send_notify(peer, handle)
        else:
            peer.left[handle] = left
        events.append((handle.chunk_done, chunk))

    def _send_notify(self, peer: _NixlPeer, handle: TransferHandle) -> None:
        if handle.notify:
            self._agent.send_notif(peer.nixl_name, NOTIFY_PREFIX + handle.notify)
