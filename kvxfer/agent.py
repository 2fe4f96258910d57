"""Agent: the public face of kvxfer. Register KV memory, meet peers, move blocks.

An Agent owns one backend, one registered KV cache, its peers and a watchdog thread
that fails transfers past their deadline. It turns block-id requests into chunks
(:mod:`kvxfer.plan`) and hands them, through its :class:`~kvxfer.pipeline.TransferGate`
(at most ``max_inflight_transfers`` at once), to the backend with a
:class:`TransferHandle`. Layer-wise streams and their receiving side are in
:mod:`kvxfer.streams`.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

from .auth import resolve_secret, warn_if_open
from .backends import BackendConfig, get_backend
from .codec import ONE_SIDED, TWO_SIDED, check_mode
from .errors import AgentClosed, KvxferError, PeerUnreachable, RemoteProtocolError
from .handle import DEMAND, TransferHandle
from .heads import exchange_heads
from .layout import KVLayout
from .memory import RegisteredMemory
from .metrics import metrics_for
from .metadata import Peer, decode_metadata, encode_metadata
from .pipeline import JoinedRead, PrefetchFills, TransferGate
from .plan import MAX_CHUNK_BYTES, merge_runs
from .streams import Inbox, IncomingTransfer, WriteStream, make_handle
from .transport import report as report_transport

__all__ = ["Agent", "Peer", "decode_metadata"]


def _order_stream_after(stream: Any, memory: RegisteredMemory) -> None:
    """Make the engine's ``stream`` wait (on the GPU) for what the calling backend
    thread queued on its own stream."""
    import torch

    done = torch.cuda.Event()
    done.record(memory.thread_stream())
    stream.wait_event(done)

def _one_sided_codec(backend: str, compression: str) -> str:
    return (f"compression={compression!r} needs a two-sided backend "
            f"({', '.join(TWO_SIDED)}): {backend!r} is one-sided (the peer's memory is read "
            f"directly, nothing of ours decodes there); checksum=True works on it")


MAX_NOTIFY = 64 << 10
WATCHDOG_PERIOD = 0.05


class Agent:
    """Moves KV blocks between this process and peers.

    Args:
        name: unique name of this agent among its peers.
        backend: "tcp" (built in) or another registered backend.
        listen: "host:port" where the backend accepts peers (port 0: any free port).
        chunk_bytes: largest piece a transfer is split into (smaller requests are split
            into smaller pieces, down to 256 KiB, so sending and receiving overlap).
        max_inflight: chunks outstanding per peer; with chunk_bytes, bounds memory.
        transfer_timeout: default deadline of a transfer, in seconds.
        connect_timeout: seconds to reach a peer.
        staged: move host memory through staging buffers as CUDA memory is.
        max_unread_notify_bytes: bound on the messages of incoming writes that
            :meth:`notifications` has not yet returned. Past it, a write that carries a
            notify fails on the writer's side (tcp, ucx: RemoteError E_BACKLOG, the
            message not delivered) or its message waits inside the backend (nixl, whose
            writer has finished by then) until this side reads its notifications.
        max_inflight_transfers: transfers running at once, across peers; past it,
            reads and writes queue (demand before prefetch), never fail for load
            (:attr:`queued_transfers` is the queue's depth).
        max_incoming: incoming streams (:meth:`incoming`) the engine has not asked
            about that are held; past it, a writer's stream fails with E_BACKLOG.
        transfer_buffer_bytes: bytes the staging buffers of all connections hold
            together (pinned memory for a CUDA cache; tcp, ucx, nccl). Past it, a chunk
            that must be packed waits for a buffer to come back; a receive in progress
            may pass it by its one chunk. None: no limit. At least ``chunk_bytes``.
        compression: "none"; "lz4" (bit shuffle + LZ4, for links slower than the CPU
            can compress, ~1 Gbit/s); "zstd" (byte shuffle + zstd-1: a better ratio,
            slower); "auto" (per peer, compress only while measured to be faster end to
            end). Agreed with each peer in the handshake (the initiator's wish first);
            with a peer that cannot decode the codec, the connection goes uncompressed
            and says so in a warning. Two-sided backends only (tcp, ucx, nccl).
        checksum: an xxh3-64 of every chunk, checked before the chunk is placed (it is
            received into staging first); a mismatch fails the transfer with
            :class:`~kvxfer.errors.ChecksumMismatch` as its cause, the blocks untouched.
            On when either side of a connection asks. nixl (one-sided): the reader
            lands a read in its own buffer, asks the owner for the xxh3-64 of the same
            blocks and places the chunk only if both agree; a writer sends the xxh3-64 of
            each chunk it wrote, which the receiver checks against the landed bytes (they
            are in its blocks by then: a mismatch fails its :meth:`incoming` stream and
            is logged; the writer's handle is not told). See the README's nixl limits.
        metrics: Prometheus metrics of this agent's transfers (:mod:`kvxfer.metrics`):
            True for prometheus_client's default registry, a ``CollectorRegistry``, or
            None (default: off, no cost on the data path).
        secret: a secret shared by the deployment (at least 16 bytes; default:
            ``$KVXFER_SECRET``, else None). With it every connection proves both sides
            know it before any other frame (tcp, ucx, nccl), :meth:`metadata` carries a
            tag and :meth:`add_peer` refuses metadata without the right one
            (:mod:`kvxfer.auth`). Without it, listening beyond loopback logs a warning.
        hello_timeout: seconds a connecting peer has to finish its handshake.
        max_connections: peers served at once; more are refused (two-sided backends).
        discovery: where agents find each other, e.g. :class:`kvxfer.discovery.Etcd`.
            Once a KV cache is registered the agent publishes its metadata there (under
            a lease kept alive, withdrawn by close()), and ``add_peer(name)`` looks
            peers up by name. Transfers never depend on it being up.

    Raises:
        BackendUnavailable: the backend's library is missing (names the pip extra).
        PeerUnreachable: cannot listen on ``listen``.
        ValueError: a bad argument; compression asked of a one-sided backend (nixl),
            or a codec whose library is missing.
    """

    def __init__(self, name: str, backend: str = "tcp", listen: str = "127.0.0.1:0", *,
                 chunk_bytes: int = 4 << 20, max_inflight: int = 4,
                 transfer_timeout: float = 30.0, connect_timeout: float = 10.0,
                 staged: bool = False, max_unread_notify_bytes: int = 64 << 20,
                 max_inflight_transfers: int = 64, max_incoming: int = 4096,
                 transfer_buffer_bytes: int | None = 512 << 20,
                 compression: str = "none", checksum: bool = False,
                 metrics: Any = None, secret: bytes | str | None = None,
                 hello_timeout: float = 5.0, max_connections: int = 1024,
                 discovery: Any = None) -> None:
        if not name or not isinstance(name, str):
            raise ValueError("an agent needs a non-empty name")
        if max_unread_notify_bytes < MAX_NOTIFY:
            raise ValueError(f"max_unread_notify_bytes must be at least one notify "
                             f"({MAX_NOTIFY}), got {max_unread_notify_bytes}")
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        if transfer_buffer_bytes is not None and transfer_buffer_bytes < chunk_bytes:
            raise ValueError(f"transfer_buffer_bytes ({transfer_buffer_bytes}) must hold at "
                             f"least one chunk ({chunk_bytes})")
        check_mode(compression)
        if compression != "none" and backend in ONE_SIDED:
            raise ValueError(_one_sided_codec(backend, compression))
        if transfer_timeout <= 0:
            raise ValueError(f"transfer_timeout must be positive, got {transfer_timeout}")
        self.name = name
        # Changes on every start: a restarted agent under this name is another peer.
        self.incarnation = uuid.uuid4().hex
        self.discovery = discovery
        self._registration: Any = None  # discovery's lease on our entry, once published
        self.transfer_timeout = float(transfer_timeout)
        self._metrics = metrics_for(metrics)  # None when off; resolved before the backend opens
        self.config = BackendConfig(chunk_bytes=chunk_bytes, max_inflight=max_inflight,
                                    connect_timeout=connect_timeout, staged=staged,
                                    transfer_buffer_bytes=transfer_buffer_bytes,
                                    compression=compression, checksum=bool(checksum),
                                    secret=resolve_secret(secret), hello_timeout=hello_timeout,
                                    max_connections=max_connections)
        cls = get_backend(backend)
        if compression != "none" and cls.one_sided:
            raise ValueError(_one_sided_codec(backend, compression))
        self.backend = cls(name, listen, self.config)
        warn_if_open(name, listen, self.config.secret)
        self.backend_name = backend
        self._lock = threading.Lock()
        self._closed = False
        self._layout: KVLayout | None = None
        self._memory: RegisteredMemory | None = None
        self._peers: dict[str, Peer] = {}
        self._adding: dict[str, threading.Lock] = {}  # add_peer of one name at a time
        self.max_unread_notify_bytes = max_unread_notify_bytes
        self._pending: set[TransferHandle] = set()
        self._gate = TransferGate(max_inflight_transfers)
        self._fills = PrefetchFills()  # what pending prefetch reads fill
        self._inbox = Inbox(max_unread_notify_bytes, max_incoming)
        self.backend.on_corrupt = self._inbox.corrupt
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name=f"kvxfer-watchdog[{name}]")
        self._watchdog.start()

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Fail pending transfers, close connections, join threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        self._stop.set()
        try:
            if self._registration is not None:
                self._registration.close()  # withdraws our entry at once (best effort)
            self.backend.close()
        finally:
            for handle in pending:
                handle.fail(AgentClosed(f"agent {self.name!r} closed"))
            if self._watchdog is not threading.current_thread():
                self._watchdog.join(timeout=5)
            self._memory = None

    def _check_open(self) -> None:
        if self._closed:
            raise AgentClosed(f"agent {self.name!r} is closed")

    def _watch(self) -> None:
        while not self._stop.wait(WATCHDOG_PERIOD):
            now = time.monotonic()
            with self._lock:
                expired = [h for h in self._pending if h.deadline <= now]
            for handle in expired:
                handle.expire()

    # ---------------------------------------------------------- registration
    def register_kv_cache(self, layout: KVLayout) -> None:
        """Register the engine's KV cache; peers may read and write it from now on.

        Raises:
            KvxferError: a KV cache is already registered, or the agent is closed.
            TypeError: ``layout`` is not a KVLayout.
        """
        self._check_open()
        if not isinstance(layout, KVLayout):
            raise TypeError(f"register_kv_cache takes a KVLayout, got {type(layout).__name__}")
        with self._lock:
            if self._layout is not None:
                raise KvxferError(f"agent {self.name!r} already has a KV cache registered")
            self._layout = layout
            self._memory = RegisteredMemory(layout, staged=self.backend.config.staged)
        self.backend.start(self._memory, self._inbox.deliver)
        if self.discovery is not None:
            # Published now if the service answers; else retried in the background.
            self._registration = self.discovery.register(self.name, self.metadata)

    @property
    def layout(self) -> KVLayout:
        if self._layout is None:
            raise KvxferError(f"agent {self.name!r}: call register_kv_cache() first")
        return self._layout

    def metadata(self) -> bytes:
        """Bytes a peer passes to its :meth:`add_peer` to reach this agent."""
        self._check_open()
        return encode_metadata(self.name, self.backend_name, self.backend.address(),
                               self.layout.descriptor.to_bytes(),
                               self.backend.backend_metadata(), self.incarnation,
                               self.config.secret)

    def add_peer(self, metadata: bytes | str) -> Peer:
        """Connect to the agent whose :meth:`metadata` this is, or to the agent
        registered under this name in ``discovery``.

        Adding the same metadata again returns the same Peer while its connection is up.
        Other metadata under a known name (the peer restarted) replaces the old
        connection: its transfers fail with PeerUnreachable, it is closed and freed, and
        the old Peer object refuses new transfers. Safe to call from several threads.

        A name is looked up each time: while that agent runs, the same Peer comes back;
        once it restarted, its new incarnation replaces the old connection as above.

        Raises:
            RemoteProtocolError: malformed metadata.
            AuthenticationFailed: this agent has a secret and the metadata is not tagged
                with it, or the peer fails to prove it knows it.
            PeerNotFound: no live agent of that name is registered (discovery).
            DiscoveryUnavailable: discovery cannot be reached to look the name up.
            ValueError: a name, without ``discovery``.
            LayoutMismatch: its KV layout cannot exchange blocks with ours (names the field;
                ``heads`` when its tensor-parallel shard shares no KV head with ours).
            PeerUnreachable: another backend, or it cannot be reached.

        A peer of the same model geometry but another tensor-parallel shard is accepted:
        reads and writes move the KV heads both hold (``peer.shared_heads``).
        """
        self._check_open()
        if isinstance(metadata, str):
            if self.discovery is None:
                raise ValueError(f"add_peer({metadata!r}) by name needs Agent(discovery=...); "
                                 "without it pass the peer's metadata() bytes")
            metadata = self.discovery.lookup(metadata)
        info = decode_metadata(metadata, self.config.secret)
        if info.name == self.name:
            raise ValueError(f"agent {self.name!r} cannot add itself as a peer")
        if info.backend != self.backend_name:
            raise PeerUnreachable(f"peer {info.name!r} uses backend {info.backend!r}, "
                                  f"this agent {self.backend_name!r}")
        self.layout.descriptor.check_compatible(info.descriptor)
        heads = exchange_heads(self.layout.descriptor, info.descriptor)
        with self._lock:
            adding = self._adding.setdefault(info.name, threading.Lock())
        with adding:  # one connection per name, however many threads add it at once
            with self._lock:
                existing = self._peers.get(info.name)
            if existing is not None and existing.alive and existing._metadata == metadata:
                return existing
            peer = Peer(info, self.backend.connect(info), metadata, heads)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._peers[info.name] = peer
            if closed:
                self.backend.disconnect(peer._conn, AgentClosed(f"agent {self.name!r} closed"))
                raise AgentClosed(f"agent {self.name!r} is closed")
            if existing is not None:  # a restarted peer (or a dead link) replaces the old
                self.backend.disconnect(existing._conn, PeerUnreachable(
                    f"peer {info.name!r} was added again (restarted at {info.address}); "
                    "this connection to its predecessor is closed"))
        report_transport(self, peer)  # peer.transport, an INFO line, a warning if on TCP
        return peer

    @property
    def peers(self) -> dict[str, Peer]:
        with self._lock:
            return dict(self._peers)

    # ------------------------------------------------------------ transfers
    def read(self, peer: Peer, remote_blocks: Sequence[int], local_blocks: Sequence[int],
             layers: Iterable[int] | None = None, timeout: float | None = None,
             stream: Any = None, priority: str = DEMAND) -> TransferHandle:
        """Pull the peer's blocks into ours: ``remote_blocks[i]`` -> ``local_blocks[i]``.

        Args:
            peer: from :meth:`add_peer`.
            remote_blocks, local_blocks: equally long block-id lists, any order.
            layers: layer indices to move (default: all).
            timeout: the transfer's deadline in seconds (default: the agent's).
            stream: a ``torch.cuda.Stream`` of the engine's (CUDA caches only). Before
                the handle reports done, that stream is made to wait, on the GPU, for
                the backend's copies into the blocks; the engine's thread never waits
                for the device. Without it the blocks are ready for any stream once the
                handle is done (the backend waited for its own stream, never the
                engine's or the device).
            priority: "demand" (default) or "prefetch". A peer's queued prefetch chunks
                go only when no demand chunk is waiting (both count in max_inflight);
                a prefetch can be cancelled like any transfer. A demand read whose
                every block a pending prefetch is filling from the same remote block
                (for these layers) waits for that prefetch, promoted to demand, instead
                of moving the bytes again; if the prefetch fails or is cancelled, the
                read fetches those blocks itself. Cancelling such a read leaves the
                prefetch running.

        Returns:
            A TransferHandle; ``wait_layer(i)`` returns as soon as layer i has landed.

        Raises:
            BlockOutOfRange: a local block id or a layer is outside our layout (nothing
                is sent). A remote id outside the peer's layout fails the handle.
            ValueError: the lists differ in length, a destination block is named twice,
                or the peer is not ours.
            AgentClosed: the agent is closed.
        """
        return self._submit("read", peer, local_blocks, remote_blocks, layers, b"", timeout,
                            None, stream, priority)

    def write(self, peer: Peer, local_blocks: Sequence[int], remote_blocks: Sequence[int],
              layers: Iterable[int] | None = None, notify: bytes = b"",
              timeout: float | None = None, event: Any = None,
              priority: str = DEMAND) -> TransferHandle:
        """Push our blocks into the peer's: ``local_blocks[i]`` -> ``remote_blocks[i]``.

        Args:
            notify: delivered to the peer's :meth:`notifications` once every byte of the
                write has landed there (not delivered if any chunk was refused). A
                write of no blocks with a notify just sends the message.
            event: a ``torch.cuda.Event`` the engine recorded after computing the source
                KV (or anything with a non-blocking ``query()``): no byte of the source
                is read before it has completed. Neither this call nor a backend thread
                blocks on it; other transfers go first meanwhile.
            others: as for :meth:`read`.

        Returns:
            A TransferHandle; done when the peer has acknowledged every chunk, after
            which the local source blocks may be reused.

        Raises:
            As for :meth:`read`; ValueError for a notify over 64 KiB; TypeError for an
            ``event`` without ``query()``.
        """
        notify = bytes(notify)
        if len(notify) > MAX_NOTIFY:
            raise ValueError(f"notify of {len(notify)} bytes exceeds {MAX_NOTIFY}")
        if event is not None and not callable(getattr(event, "query", None)):
            raise TypeError(f"event must be a torch.cuda.Event (or have query()), got "
                            f"{type(event).__name__}")
        return self._submit("write", peer, local_blocks, remote_blocks, layers, notify, timeout,
                            event, None, priority)

    def write_stream(self, peer: Peer, local_blocks: Sequence[int], remote_blocks: Sequence[int],
                     request: bytes, layers: Iterable[int] | None = None,
                     timeout: float | None = None, priority: str = DEMAND) -> WriteStream:
        """A write that sends each layer as soon as the engine says it is computed.

        Call ``s.layer_ready(i, event)`` after computing layer i and ``s.finish()`` at
        the end; the peer's :meth:`incoming` (``request``) sees each layer land.

        Args:
            request: the key the receiver asks :meth:`incoming` for (at most 1 KiB);
                unique among this agent's streams to that peer while they run.
            others: as for :meth:`write`.

        Returns:
            A :class:`~kvxfer.streams.WriteStream`; ``s.handle`` is its TransferHandle.

        Raises:
            As for :meth:`write`.
        """
        return self._submit("write", peer, local_blocks, remote_blocks, layers, b"", timeout,
                            None, None, priority, key=bytes(request))

    def incoming(self, request: bytes, peer: Peer | str | None = None) -> IncomingTransfer:
        """What has landed of the stream ``request`` a peer writes to us.

        Asked before or after its first bytes arrive, the same object answers:
        ``wait_layer(i)`` returns once layer i is in our blocks, ``wait()`` once the
        writer finished. Held in a bounded table (see ``max_incoming``).

        Args:
            request: the key the writer passed to :meth:`write_stream`.
            peer: the writing peer (a Peer or its name); default: the only peer added.

        Raises:
            ValueError: no peer given and this agent has not exactly one.
        """
        if peer is None:
            names = list(self.peers)
            if len(names) != 1:
                raise ValueError(f"incoming() needs peer= when an agent has {len(names)} "
                                 "peers")
            peer = names[0]
        name = peer.name if isinstance(peer, Peer) else str(peer)
        return self._inbox.incoming.get(name, bytes(request))

    @property
    def queued_transfers(self) -> int:
        """Transfers waiting for one of the ``max_inflight_transfers`` slots."""
        return self._gate.queued

    @property
    def running_transfers(self) -> int:
        """Transfers handed to the backend and not yet done."""
        return self._gate.running

    def _submit(self, op: str, peer: Peer, local: Sequence[int], remote: Sequence[int],
                layers: Iterable[int] | None, notify: bytes, timeout: float | None,
                event: Any, stream: Any, priority: str, key: bytes | None = None) -> Any:
        self._check_open()
        layout, memory = self.layout, self._memory
        assert memory is not None
        if stream is not None and memory.is_host:
            raise ValueError("stream= orders reads into a CUDA KV cache; this one is in host "
                             "memory, where a done handle means the bytes are in place")
        if not isinstance(peer, Peer):
            raise ValueError(f"{peer!r} is not a peer of agent {self.name!r}")
        current = self._peers.get(peer.name)
        if current is not peer:
            if current is None:
                raise ValueError(f"{peer!r} is not a peer of agent {self.name!r}")
            raise PeerUnreachable(f"peer {peer.name!r} was added again since this Peer was "
                                  "made: use the Peer add_peer returned last")
        runs = merge_runs(local, remote)
        layout.check_blocks(lo + n - 1 for lo, _, n in runs)
        # A destination block named twice is ambiguous; the peer refuses to serve any of
        # its blocks twice in one chunk (bounded work), so say so before sending. Only a
        # write's local sources may repeat (packed on this side).
        checks = [("remote", remote)] + ([("local", local)] if op == "read" else [])
        for side, ids in checks:
            if len(set(ids)) != len(ids):
                raise ValueError(f"{op} names a {side} block more than once")
        layer_list = layout.normalize_layers(layers)
        block_bytes = peer.heads.nbytes(memory.layer_block_bytes)  # our heads it shares
        deadline = time.monotonic() + (self.transfer_timeout if timeout is None else timeout)
        if op == "read" and priority == DEMAND and stream is None and key is None and \
                (sources := self._fills.covering(peer.name, runs, layer_list)):
            return self._join(peer, layer_list, deadline, sources)
        handle = make_handle(next(self._ids), peer.name, op, runs, layer_list, block_bytes,
                             self.config, deadline, notify=notify, event=event,
                             priority=priority, key=key)
        handle.heads = peer.heads if peer.heads.sliced else None
        if stream is not None:
            handle.before_done = lambda: _order_stream_after(stream, memory)
        result = WriteStream(handle, MAX_NOTIFY) if key is not None else handle  # type: ignore
        if handle.done():
            return result
        with self._lock:
            self._check_open()
            self._pending.add(handle)
        handle.quiesce = self.backend.quiesce
        handle.add_done_callback(self._forget)
        if self._metrics is not None:
            self._metrics.track(handle, self.backend_name)
        if op == "read" and priority != DEMAND:
            self._fills.add(peer.name, runs, handle)
        self._gate.admit(handle, lambda h: self.backend.submit(peer._conn, h))
        return result

    def _join(self, peer: Peer, layers: list[int], deadline: float,
              sources: dict[TransferHandle, list]) -> JoinedRead:
        """A demand read whose blocks pending prefetches already fill: follow them."""
        def refetch(pairs: list) -> TransferHandle:
            return self._submit("read", peer, [lo for lo, _, _ in pairs],
                                [ro for _, ro, _ in pairs], layers, b"",
                                max(1e-3, deadline - time.monotonic()), None, None, DEMAND)

        handle = JoinedRead(next(self._ids), peer.name, layers, deadline, sources, refetch)
        with self._lock:
            self._check_open()
            self._pending.add(handle)
        handle.add_done_callback(self._forget)
        return handle

    def _forget(self, handle: TransferHandle) -> None:
        with self._lock:
            self._pending.discard(handle)

    # --------------------------------------------------------- notifications
    def notifications(self) -> list[tuple[str, bytes]]:
        """Messages of completed incoming writes since the last call: (peer name, bytes)."""
        return self._inbox.take_notifications()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.backend_name
        return f"Agent({self.name!r}, {state}, {len(self._peers)} peers)"
