"""UCX backend (ucxx): kvxfer's frames on UCX streams, each chunk one tagged message.

Theory of operation
-------------------
ucxx's Python API offers tag, stream and active messages but no RMA (no memory
mapping, rkeys, put or get), so this backend is two-sided like TCP and shares its
machinery (:mod:`kvxfer.backends.twosided`): a UCX endpoint carries the same frames a
TCP socket does, and UCX picks the path between the two processes (RDMA or TCP
between hosts, shared memory on one, CUDA IPC for device buffers)::

    this process                                       peer process
    UCXWorker: ucxx progress thread (epoll, blocking)  UCXWorker, likewise
               + our notifier thread (wakes waiters)
    _ClientSide send/read threads --endpoint---------> listener -> _ServerSide thread
        first on each stream: the 4-byte key the peer must tag our payloads with
        frame   = stream_send(header+body) + tag_send(chunk, key << 32 | n)
        reader: stream_recv(20-byte header) -> stream_recv(body)
                -> tag_recv(staging buffer, key << 32 | n) -> unpack into the blocks

- Every chunk is staged (packed into one contiguous buffer, unpacked on arrival; one
  memcpy per block run for host memory, the packing kernel for CUDA) and sent as one
  tagged message, so UCX can use rendezvous (zero-copy RDMA or cma get, CUDA IPC)
  instead of the stream API's eager copies. Tags are matched per worker, not per
  endpoint: each channel's key is unique on its worker, and payloads are numbered per
  direction, so two peers' chunks never meet.
- Waiting costs nothing while idle. One agent has two threads of its own in UCX:
  ucxx's progress thread, asleep in epoll until the network has something, and a
  notifier thread asleep in ucxx's request notifier (``enable_python_future``: every
  request completed by the progress thread is queued to it). A channel thread posts
  its operations, then blocks on a ``threading.Event`` that the notifier sets once
  they have all completed; shutting the channel down (or the peer's endpoint closing)
  sets it too, and the wait honours ``set_timeout``. Only a tagged payload, expected
  within moments of its frame's header, is awaited by probing (backing off).
- Every request takes one of ucxx's pre-made futures; the notifier refills that pool
  and hands out a budget below its floor, so posting never has to make one on a
  thread without an event loop (:mod:`kvxfer.backends.ucx_requests`).
- Buffers stay referenced until UCX is done with them. Shutting a channel down (a dead
  peer, a handle's abort, close) closes its endpoint, cancelling posted receives; a
  payload can only ever land in a staging buffer, never straight in KV memory. A
  channel forgets its endpoint's callbacks and the requests the close cancelled (or
  the endpoint keeps its worker alive) and leaves the backend when it closes, so a
  peer that restarts, or an agent that closes, leaves nothing behind.
- Endpoints are created with error handling on, so a dead peer fails the pending
  requests (and fires the close callback): the channel raises PeerUnreachable and the
  connection's handles fail, instead of hanging. One endpoint per peer, reused.
  UCX's shared-memory transports (sysv, posix) do not offer error handling unless told
  to (``MM_ERROR_HANDLING=y``), and without them two processes on one host talk over
  TCP loopback; we turn it on (a killed peer is still caught: the conformance suite's
  killed-peer test runs over it). benchmarks/RESULTS.md has the figures.
- UCX_TLS: host memory uses ``HOST_TLS`` (no CUDA transports), CUDA memory ``CUDA_TLS``
  (all, for cuda_copy / cuda_ipc / gdr_copy); a UCX_TLS in the environment wins.
  CUDA memory is packed into a device staging buffer that UCX moves with cuda_copy /
  cuda_ipc (guarded: only when torch sees CUDA).
- The UCX listener binds every interface on the ``listen`` port; ``address()``
  advertises the ``listen`` host.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import PeerUnreachable, RemoteProtocolError
from ..logs import get_logger
from ..protocol import HEADER_SIZE, NEED_DATA, Connection, Event
from ..protocol.frames import HEADER
from .base import BackendConfig, PeerInfo, parse_host_port
from .twosided import Abandoned, Channel, Guard, TwoSidedBackend
from .ucx_requests import Notifier, release_cancelled_requests

log = get_logger("kvxfer.ucx")


def _import_ucxx() -> tuple[Any, Any, dict[str, str]]:
    """Import ucxx, leaving ``os.environ`` as it was; returns its tuning besides.

    Importing ucxx tunes UCX through os.environ, which every later UCX user in the
    process reads too (NIXL's gets ran 5x slower here under its UCX_RNDV_THRESH=8192).
    Keep that tuning for our own contexts only: note what the import changed, put every
    key back, pass the UCX ones per context. (UCX_MEMTYPE_CACHE is not an option of the
    UCX ucxx ships with; it would only draw a warning.)
    """
    before = dict(os.environ)
    try:
        import ucxx._lib.libucxx as libucxx
        from ucxx._lib.arr import Array as array
    finally:
        after = dict(os.environ)
        for key in set(before) | set(after):
            if key not in before:
                del os.environ[key]
            elif after.get(key) != before[key]:
                os.environ[key] = before[key]
    tuning = {k[4:]: v for k, v in after.items()
              if k.startswith("UCX_") and before.get(k) != v and k != "UCX_MEMTYPE_CACHE"}
    return libucxx, array, tuning


ucx, Array, UCXX_TUNING = _import_ucxx()

# Host memory: every transport but CUDA's (RDMA where present, else TCP; shared memory on
# one host), so no CUDA context is made. CUDA memory: all of them, cuda_copy / cuda_ipc /
# gdr_copy included. Naming absent transports (say "rc" here) makes UCX warn, so exclude.
HOST_TLS = "^cuda"
CUDA_TLS = "all"
_KEY = struct.Struct("!I")  # a channel's payload-tag key, first on each side's stream
CLOSE_PERIOD_NS = 1_000_000_000  # wait at most 1 s for an endpoint to close


def ucx_options(host_memory: bool) -> dict[str, str]:
    """UCX settings for a context moving host (or CUDA) memory; the environment wins.

    Args:
        host_memory: the registered KV cache is in host memory.

    Returns:
        UCX options without the ``UCX_`` prefix, for ``UCXContext(config_dict=...)``.
    """
    options = {**UCXX_TUNING, "TLS": HOST_TLS if host_memory else CUDA_TLS,
               "MM_ERROR_HANDLING": "y", "WARN_UNUSED_ENV_VARS": "n"}
    return {k: v for k, v in options.items() if f"UCX_{k}" not in os.environ}


def _array(buf: object) -> Array:
    if isinstance(buf, torch.Tensor):  # a CUDA staging buffer (__cuda_array_interface__)
        return Array(buf)
    return Array(memoryview(buf).cast("B"))  # type: ignore[arg-type]


def _nbytes(buf: object) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return memoryview(buf).nbytes  # type: ignore[arg-type]


class UcxChannel(Channel):
    """One UCX endpoint as a frame channel; each call blocks until its requests complete.

    Frames (header and body) travel on the endpoint's stream; a frame's payload, one
    staged buffer, travels as one tagged message so that UCX can move it zero-copy
    (rendezvous: RDMA or cma get, CUDA IPC). Tags are matched per worker, not per
    endpoint, so each side picks a key unique on its own worker and tells the peer
    first thing on the stream; the peer tags the n-th payload it sends us
    ``key << 32 | n``.

    A tagged receive completes without error when the message is shorter than its
    buffer, leaving the rest stale; so the receiver probes the message first and
    refuses (ending the connection) one whose length is not the frame's payload length.

    Args:
        ep: a connected ucxx endpoint (error handling on).
        notifier: its worker's notifier (posts and waits go through it).
        recv_key: this side's key, unique among the worker's channels (< 2**32).
        on_closed: called once the endpoint is closed, with this channel.
    """

    def __init__(self, ep: Any, notifier: Notifier, recv_key: int,
                 on_closed: Callable[["UcxChannel"], None]) -> None:
        self.ep = ep
        self.notifier = notifier
        self.conn = Connection()
        self._recv_key = recv_key
        self._on_closed = on_closed
        self._send_key: Optional[int] = None  # the peer's key, once its first bytes came
        self._key_lock = threading.Lock()
        self._send_seq = 0  # payloads sent (sender thread only)
        self._recv_seq = 0  # payloads received (reader thread only)
        self._timeout: Optional[float] = None
        self._down: Optional[str] = None  # why the channel is unusable; set once
        self._closed = False  # the endpoint is closed
        self._close_lock = threading.Lock()
        self.orphans: list[tuple[list, list]] = []  # requests abandoned mid-flight
        self._header = bytearray(HEADER_SIZE)
        ep.set_close_callback(self._on_close)

    def _on_close(self, *_: object) -> None:  # from UCX's progress thread
        if self._down is None:
            self._down = "the UCX endpoint closed (peer gone or unreachable)"
        self.notifier.wake_channel(self)

    def _deadline(self) -> Optional[float]:
        return None if self._timeout is None else time.monotonic() + self._timeout

    # ---------------------------------------------------------------- waiting
    def _run(self, post: Any, buffers: Sequence[object]) -> None:
        """Post one stream operation per buffer, then wait for all of them."""
        self._run_posts([(post, b) for b in buffers])

    def _run_posts(self, posts: Sequence[tuple[Any, object]]) -> None:
        """Post ``post(buffer)`` for each pair (empty buffers skipped), then wait for all."""
        if self._down is not None:
            raise PeerUnreachable(f"UCX channel is down: {self._down}")
        arrays = [(post, _array(b)) for post, b in posts if _nbytes(b)]
        try:
            with self._close_lock:  # posting on an endpoint being closed crashes UCX
                if self._closed:
                    raise PeerUnreachable(f"UCX channel is down: {self._down}")
                requests = self.notifier.post([lambda p=p, a=a: p(a) for p, a in arrays])
        except PeerUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - any ucxx failure ends the channel
            self._down = self._down or str(exc)
            raise PeerUnreachable(f"UCX post failed: {exc}") from exc
        try:
            self.notifier.wait(requests, self, lambda: self._down, self._deadline(),
                               self._timeout)
            for request in requests:
                request.check_error()
        except PeerUnreachable:
            self.orphans.append((requests, arrays))  # UCX may still use them
            raise
        except Exception as exc:  # noqa: BLE001 - UCX reports a dead peer this way
            self._down = self._down or f"{type(exc).__name__}: {exc}"
            self.orphans.append((requests, arrays))
            raise PeerUnreachable(f"UCX transfer failed: {self._down}") from exc

    def _poll_until(self, done: Callable[[], bool], deadline: Optional[float]) -> None:
        """Poll ``done()`` (backing off to 1 ms) until true; PeerUnreachable if the
        channel goes down or ``deadline`` (monotonic) passes first. Only for what is
        due at once (a payload after its header): idle waits block in the notifier."""
        spins = 0
        while not done():
            if self._down is not None or (deadline and time.monotonic() > deadline):
                why = self._down or f"no progress within {self._timeout} s"
                raise PeerUnreachable(f"UCX channel is down: {why}")
            spins += 1
            time.sleep(0 if spins < 64 else min(1e-3, 2e-5 * (spins - 63)))

    def _recv_exact(self, buffers: Sequence[object]) -> None:
        self._run(self.ep.stream_recv, buffers)

    def exchange_keys(self) -> int:
        """Ours goes out, the peer's is the first 4 bytes in; once, on first use."""
        with self._key_lock:
            if self._send_key is None:
                got = bytearray(_KEY.size)
                self._run_posts([(self.ep.stream_send, _KEY.pack(self._recv_key)),
                                 (self.ep.stream_recv, got)])
                self._send_key = _KEY.unpack(got)[0]
            return self._send_key

    def _tag(self, key: int, seq: int) -> Any:
        return ucx.UCXXTag((key << 32) | (seq & 0xFFFFFFFF))

    def _send_frame(self, buffers: Sequence[object]) -> None:
        key = self.exchange_keys()
        head, payload = buffers[0], [b for b in buffers[1:] if _nbytes(b)]
        if len(payload) > 1:
            raise ValueError("the UCX channel carries a payload as one staged buffer")
        posts: list[tuple[Any, object]] = [(self.ep.stream_send, head)]
        if payload:
            tag = self._tag(key, self._send_seq)
            self._send_seq += 1
            posts.append((lambda a: self.ep.tag_send(a, tag), payload[0]))
        self._run_posts(posts)

    def _recv_tagged(self, buffer: object) -> None:
        """Receive the next payload into ``buffer``, which it must fill exactly."""
        tag = self._tag(self._recv_key, self._recv_seq)
        self._recv_seq += 1
        probe: list = []

        def arrived() -> bool:
            result = self.notifier.worker.tag_probe(tag, remove=True)
            if result.matched:
                probe.append(result)
            return bool(probe)

        self._poll_until(arrived, self._deadline())
        got, want = probe[0].length, _nbytes(buffer)
        if got != want:
            if 0 < got < want:  # take it off UCX's hands (a staging buffer: never unpacked)
                view = buffer[:got] if isinstance(buffer, torch.Tensor) else \
                    memoryview(buffer).cast("B")[:got]  # type: ignore[arg-type]
                self._run_posts([(lambda a: self.ep.tag_recv_with_handle(a, probe[0]), view)])
            self._down = self._down or "a payload of the wrong length"
            raise RemoteProtocolError(f"peer sent a payload of {got} bytes for a frame "
                                      f"announcing {want}")
        self._run_posts([(lambda a: self.ep.tag_recv_with_handle(a, probe[0]), buffer)])

    # --------------------------------------------------------------- Channel
    def send(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> None:
        if guard is None:
            self._send_frame(buffers)
            return
        with guard.data_lock:  # UCX reads the buffers until the sends complete
            if not guard.active:
                raise Abandoned(0)
            self._send_frame(buffers)

    def next_event(self) -> Event:
        self.exchange_keys()
        ev = self.conn.next_event()
        if ev is not NEED_DATA:
            return ev
        self._recv_exact([self._header])
        self.conn.receive_data(self._header)
        ev = self.conn.next_event()  # raises RemoteProtocolError on a bad header
        if ev is NEED_DATA:
            body = bytearray(HEADER.unpack(self._header)[4])
            self._recv_exact([body])
            self.conn.receive_data(body)
            ev = self.conn.next_event()
        return ev

    def recv_payload(self, buffers: Sequence[object], guard: Optional[Guard] = None) -> bool:
        """Receive the payload into one staging buffer (ours, so ``guard`` is not needed:
        the caller unpacks it into KV memory under its own guard)."""
        buffers = [b for b in buffers if _nbytes(b)]
        if not buffers and not self.conn.payload_remaining:
            return True
        if len(buffers) != 1 or _nbytes(buffers[0]) != self.conn.payload_remaining:
            raise ValueError("the UCX channel receives a payload into one staged buffer "
                             "of the payload's size")
        self._recv_tagged(buffers[0])
        self.conn.payload_received_elsewhere(_nbytes(buffers[0]))
        return True

    def drain_payload(self) -> None:
        n = self.conn.payload_remaining
        if n:
            self._recv_tagged(bytearray(n))  # a tagged message must be taken whole
            self.conn.payload_received_elsewhere(n)

    def set_timeout(self, seconds: Optional[float]) -> None:
        self._timeout = seconds

    def shutdown(self) -> None:
        """Mark the channel down, wake its waiters and close its endpoint, which cancels
        posted receives: no byte of an abandoned transfer lands in KV memory afterwards.
        The endpoint's callbacks are dropped and the backend forgets the channel."""
        if self._down is None:
            self._down = "closed by this side"
        self.notifier.wake_channel(self)
        with self._close_lock:  # no post is under way while the endpoint closes
            if self._closed:
                return
            self._closed = True
            try:
                self.ep.close_blocking(period=CLOSE_PERIOD_NS, max_attempts=1)
            except Exception as exc:  # noqa: BLE001 - closing a dead endpoint may complain
                log.debug("closing a UCX endpoint: %s", exc)
        if left := release_cancelled_requests(self.ep):
            log.debug("a closed UCX endpoint holds %d unfinished requests", left)
        try:
            self.ep.remove_close_callback()  # it holds this channel: a leak through C++
        except Exception as exc:  # noqa: BLE001
            log.debug("dropping a UCX endpoint's close callback: %s", exc)
        self.orphans = [(r, a) for r, a in self.orphans if not all(x.completed for x in r)]
        self._on_closed(self)

    def close(self) -> None:
        self.shutdown()


class UcxBackend(TwoSidedBackend):
    """kvxfer over UCX (``pip install 'kvxfer[ucx]'``); see the module docstring."""

    name = "ucx"

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        # Every chunk is packed into one buffer, which UCX moves as one tagged message.
        super().__init__(agent_name, listen, dataclasses.replace(config, staged=True))
        self._host, self._port = parse_host_port(listen)
        self._worker: Any = None
        self._notifier: Optional[Notifier] = None
        self._listener: Any = None
        self._channels: set[UcxChannel] = set()  # open channels (under _lock)
        self._orphans: list[tuple[list, list]] = []  # closed channels' unfinished requests
        self._keys = itertools.count(1)  # payload-tag keys of this worker's channels

    def address(self) -> str:
        if self._listener is None:
            raise PeerUnreachable("the UCX backend listens once a KV cache is registered")
        host = self._host if self._host not in ("0.0.0.0", "::", "") else self._listener.ip
        return f"[{host}]:{self._listener.port}" if ":" in host else f"{host}:{self._listener.port}"

    def _listen(self) -> None:
        memory = self._memory
        assert memory is not None
        if not memory.is_host and torch.cuda.is_available():
            self.staging_device = memory.layout.device  # UCX moves device buffers itself
        try:
            context = ucx.UCXContext(config_dict=ucx_options(memory.is_host),
                                     feature_flags=(ucx.Feature.STREAM, ucx.Feature.TAG,
                                                    ucx.Feature.WAKEUP))
            self._worker = ucx.UCXWorker(context, enable_python_future=True)
            self._notifier = Notifier(self._worker, self.agent_name,
                                      ucx.PythonRequestNotifierWaitState)
            self._worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
            self._listener = ucx.UCXListener.create(self._worker, self._port,
                                                    self._on_conn_request)
        except Exception as exc:  # noqa: BLE001 - ucxx raises its own exception types
            self._release()
            raise PeerUnreachable(f"UCX cannot listen on {self.listen!r}: {exc}") from exc

    def _track(self, ep: Any) -> UcxChannel:
        assert self._notifier is not None
        channel = UcxChannel(ep, self._notifier, next(self._keys), self._untrack)
        with self._lock:
            self._channels.add(channel)
        return channel

    def _untrack(self, channel: UcxChannel) -> None:
        """A channel's endpoint closed: forget it (its unfinished requests stay held)."""
        with self._lock:
            self._channels.discard(channel)
            self._orphans = [(r, a) for r, a in self._orphans + channel.orphans
                             if not all(x.completed for x in r)]

    def _on_conn_request(self, conn_request: int) -> None:  # on UCX's progress thread
        if self._closed:
            return  # closing: the listener goes next, and the request with it
        try:
            ep = self._listener.create_endpoint_from_conn_request(conn_request, True)
            self.serve_channel(self._track(ep))
        except Exception:  # noqa: BLE001 - never raise into UCX's thread
            log.exception("cannot accept a UCX connection")

    def _open_channel(self, peer: PeerInfo) -> Channel:
        host, port = parse_host_port(peer.address)
        try:
            ep = self._worker.create_endpoint_from_hostname(host, port, True)
        except Exception as exc:  # noqa: BLE001
            raise PeerUnreachable(f"cannot reach peer {peer.name!r} at {peer.address} over "
                                  f"UCX: {exc}") from exc
        return self._track(ep)

    def _stop_listening(self) -> list[threading.Thread]:
        self._listener = None  # destroys the UCX listener: no new connections
        return []

    def _release(self) -> None:
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.shutdown()
            channel.close()
        worker, self._worker = self._worker, None
        notifier, self._notifier = self._notifier, None
        try:
            if worker is not None:
                try:
                    worker.cancel_inflight_requests(period=CLOSE_PERIOD_NS, max_attempts=1)
                finally:
                    worker.stop_progress_thread()
        finally:
            if notifier is not None:
                notifier.stop()
            self._orphans = []  # the worker is stopped: UCX touches no buffer any more
