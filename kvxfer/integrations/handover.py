"""Handover: the block-lifetime protocol between a prefill and a decode worker.

Engine-free (no vLLM import), so it is tested on its own with real agents.

Theory of operation
-------------------
Prefill keeps a finished request's blocks under a lease; decode pulls them with
``Agent.read`` and then tells prefill, as a notify on a write of no blocks. Every
message is JSON behind the tag ``kvxfer-handover/1``::

    decode worker                                   prefill worker
    pull(): read(remote blocks -> local) ------->   (backend serves the read)
    read done:   {"t":"done","req":R,"meta":M} -->  lease of R held?  release R,
                                                    ack ok; else ack not ok
    ack <-------------------------------------      {"t":"ack","req":R,"ok":..}
    ok: blocks usable (finished)                    released R -> engine frees blocks
    not ok / no ack / read failed: load error
    abort(): cancel read, {"t":"abort","req":R} ->  release R at once
    heartbeat(): {"t":"renew","reqs":[R..]} ---->   lease of R extended

The fence: prefill hands a request's blocks back to its engine (``take_released``)
only after removing the lease, under the same lock that answers "done". A read whose
"done" finds no lease was possibly served from reused blocks, so its ack says not ok
and decode reports a load error, never the bytes. A "done" for a request prefill has
not yet been told about (the lease arrives with the engine's next step) is remembered
and acked ok: until the lease is registered and released the engine cannot free those
blocks. One control thread per Handover sends and receives every message, expires
leases and acks; engine threads only enqueue.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..agent import Agent, Peer
from ..errors import KvxferError
from ..logs import get_logger

TAG = b"kvxfer-handover/1 "
POLL_S = 0.002
KEEP_RELEASED = 65536  # released request ids remembered, to answer late "done"s

log = get_logger("kvxfer.handover")


@dataclass
class Pull:
    """One decode-side pull. Changed only by the Handover's control thread (and the
    done-callback, which only enqueues)."""

    key: str  # decode's request id
    remote_req: str  # prefill's request id
    peer: Optional[Peer]
    local_blocks: list[int]
    nbytes: int
    started: float = field(default_factory=time.monotonic)
    handle: Any = None
    read_s: float = 0.0  # seconds the read took, once done
    ack_deadline: float = 0.0  # set when "done" was sent
    aborted: bool = False
    scramble: bool = False  # negative-control knob: rotate the landed blocks


@dataclass
class Stats:
    """Counters since the last ``take_stats``; owned by the Handover's lock."""

    transfers: int = 0
    bytes: int = 0
    latency_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)  # prefill: reason -> count

    def fail(self, cause: str) -> None:
        self.failures[cause] = self.failures.get(cause, 0) + 1


def encode(msg: dict) -> bytes:
    return TAG + json.dumps(msg, separators=(",", ":")).encode()


def decode(raw: bytes) -> Optional[dict]:
    if not raw.startswith(TAG):
        return None
    try:
        msg = json.loads(raw[len(TAG):])
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


class Handover:
    """Prefill leases and decode pulls over one registered Agent.

    Args:
        agent: an Agent with the engine's KV cache registered.
        lease_s: how long prefill keeps blocks nobody has read (renewed by heartbeats).
        ack_timeout_s: how long decode waits for prefill's answer to "done".
    """

    def __init__(self, agent: Agent, lease_s: float = 30.0, ack_timeout_s: float = 10.0
                 ) -> None:
        self.agent = agent
        self.lease_s = float(lease_s)
        self.ack_timeout_s = float(ack_timeout_s)
        self._meta = agent.metadata()
        self._lock = threading.Lock()
        self._leases: dict[str, float] = {}  # prefill: request -> deadline
        self._early: OrderedDict[str, str] = OrderedDict()  # prefill: "done"/"abort"
        # that came before the lease (bounded like _gone)
        self._gone: OrderedDict[str, str] = OrderedDict()  # prefill: released -> why
        self._released: set[str] = set()  # prefill: for the engine to free
        self._pulls: dict[str, Pull] = {}  # decode: running pulls by key
        self._by_remote: dict[tuple[str, str], str] = {}  # decode: (peer, remote) -> key
        self._finished: set[str] = set()  # decode: loaded (or aborted): report
        self._failed: dict[str, str] = {}  # decode: key -> cause
        self._stats = Stats()
        self._todo: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"kvxfer-handover[{agent.name}]")
        self._thread.start()

    def close(self) -> None:
        """Stop the control thread (idempotent); the agent is the caller's to close."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------ prefill side
    def hold(self, req: str) -> None:
        """Prefill: keep ``req``'s blocks until decode has read them or the lease ends."""
        with self._lock:
            if req in self._early:
                self._release(req, self._early.pop(req))
            elif req not in self._gone:
                self._leases[req] = time.monotonic() + self.lease_s

    def take_released(self) -> set[str]:
        """Prefill: requests whose blocks the engine may free now."""
        with self._lock:
            out, self._released = self._released, set()
        return out

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._leases)

    def _release(self, req: str, why: str) -> None:  # under self._lock
        self._leases.pop(req, None)
        self._released.add(req)
        self._gone[req] = why
        while len(self._gone) > KEEP_RELEASED:
            self._gone.popitem(last=False)
        self._stats.released[why] = self._stats.released.get(why, 0) + 1
        log.info("kvxfer: released blocks of %s (%s)", req, why)

    # ------------------------------------------------------------- decode side
    def pull(self, key: str, peer_meta: bytes, remote_req: str, remote_blocks: Sequence[int],
             local_blocks: Sequence[int], scramble: bool = False) -> None:
        """Decode: start reading ``remote_blocks`` of the prefill agent ``peer_meta``
        into ``local_blocks``; the outcome comes from :meth:`take_results`.

        ``scramble`` is the negative control's knob: rotate the landed blocks by one
        before reporting them loaded (what a wrong block mapping would do)."""
        n = min(len(remote_blocks), len(local_blocks))
        pull = Pull(key, remote_req, None, list(local_blocks[:n]),
                    n * self.agent.layout.bytes_per_block, scramble=scramble)
        with self._lock:
            self._pulls[key] = pull
        try:
            pull.peer = self.agent.add_peer(peer_meta)
            with self._lock:
                self._by_remote[(pull.peer.name, remote_req)] = key
            pull.handle = self.agent.read(pull.peer, list(remote_blocks[:n]), pull.local_blocks)
        except (KvxferError, OSError, ValueError) as exc:
            self._fail(key, f"connect: {type(exc).__name__}: {exc}", "peer_unreachable")
            return
        pull.handle.add_done_callback(lambda h: self._todo.put(("read_done", key)))

    def abort(self, key: str) -> None:
        """Decode: the engine dropped ``key``: cancel its read (no byte lands after
        this returns) and tell prefill to free the blocks."""
        with self._lock:
            pull = self._pulls.pop(key, None)
            self._failed.pop(key, None)
            if pull is None:
                return
            pull.aborted = True
            self._finished.add(key)
        if pull.handle is not None:
            pull.handle.cancel()
        if pull.peer is not None:
            self._todo.put(("send", pull.peer, {"t": "abort", "req": pull.remote_req}))

    def abort_remote(self, peer_meta: bytes, remote_req: str) -> None:
        """Decode: free a prefill's blocks for a request decode never pulled."""
        self._todo.put(("send_meta", peer_meta, {"t": "abort", "req": remote_req}))

    def heartbeat(self, peer_meta: bytes, remote_reqs: Sequence[str]) -> None:
        """Decode: renew prefill's leases of requests still waiting to be pulled."""
        self._todo.put(("send_meta", peer_meta, {"t": "renew", "reqs": list(remote_reqs)}))

    def take_results(self) -> tuple[set[str], dict[str, str]]:
        """Decode: (pulls finished, with their blocks usable or aborted; pulls failed
        with their cause). Each key is reported once."""
        with self._lock:
            done, self._finished = self._finished, set()
            failed, self._failed = self._failed, {}
        return done, failed

    def take_stats(self) -> Stats:
        with self._lock:
            stats, self._stats = self._stats, Stats()
        return stats

    def _fail(self, key: str, cause: str, kind: str) -> None:
        with self._lock:
            pull = self._pulls.pop(key, None)
            if pull is None or pull.aborted:
                return
            self._failed[key] = cause
            self._stats.fail(kind)
        log.warning("kvxfer: load of %s failed: %s", key, cause)

    # ---------------------------------------------------------- control thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._todo.get(timeout=POLL_S)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._do(item)
                for peer_name, raw in self.agent.notifications():
                    msg = decode(raw)
                    if msg is not None:
                        self._on_message(peer_name, msg)
                self._expire()
            except Exception:  # noqa: BLE001 -- the thread must outlive one bad message
                log.exception("kvxfer handover: control step failed")

    def _send(self, peer: Peer, msg: dict) -> None:
        try:
            self.agent.write(peer, [], [], notify=encode(msg))
        except KvxferError as exc:
            log.warning("kvxfer: cannot send %s to %s: %s", msg.get("t"), peer.name, exc)

    def _do(self, item: tuple) -> None:
        if item[0] == "send":
            self._send(item[1], item[2])
        elif item[0] == "send_meta":
            try:
                peer = self.agent.add_peer(item[1])
            except (KvxferError, OSError) as exc:
                log.warning("kvxfer: cannot reach prefill for %s: %s", item[2]["t"], exc)
                return
            self._send(peer, item[2])
        elif item[0] == "read_done":
            self._read_done(item[1])

    def _read_done(self, key: str) -> None:
        with self._lock:
            pull = self._pulls.get(key)
        if pull is None or pull.aborted:
            return
        exc: Optional[BaseException] = None
        if pull.handle.status != "done":
            exc = pull.handle.error or KvxferError(f"read ended {pull.handle.status}")
        if exc is not None:
            self._fail(key, f"read: {type(exc).__name__}: {exc}", type(exc).__name__)
            return
        pull.read_s = time.monotonic() - pull.started
        pull.ack_deadline = time.monotonic() + self.ack_timeout_s
        self._send(pull.peer, {"t": "done", "req": pull.remote_req,
                               "meta": self._meta.hex()})

    def _on_message(self, peer_name: str, msg: dict) -> None:
        kind, req = msg.get("t"), str(msg.get("req", ""))
        if kind in ("done", "abort"):
            with self._lock:
                if req in self._leases:
                    ok, why = True, ""
                    self._release(req, "read" if kind == "done" else "abort")
                elif req in self._gone:
                    ok, why = False, f"blocks already released ({self._gone[req]})"
                else:
                    ok, why = True, ""
                    self._early[req] = "read" if kind == "done" else "abort"
                    while len(self._early) > KEEP_RELEASED:
                        self._early.popitem(last=False)
            if kind == "done":
                try:
                    peer = self.agent.add_peer(bytes.fromhex(msg["meta"]))
                except (KvxferError, OSError, KeyError, ValueError) as exc:
                    log.warning("kvxfer: cannot ack %s to %s: %s", req, peer_name, exc)
                    return
                self._send(peer, {"t": "ack", "req": req, "ok": ok, "why": why})
        elif kind == "renew":
            now = time.monotonic()
            with self._lock:
                for r in msg.get("reqs", []):
                    if r in self._leases:
                        self._leases[r] = max(self._leases[r], now + self.lease_s)
        elif kind == "ack":
            with self._lock:
                key = self._by_remote.pop((peer_name, req), None)
                pull = self._pulls.get(key) if key is not None else None
            if pull is None or pull.aborted:
                return
            if not msg.get("ok"):
                self._fail(key, f"fenced: prefill says {msg.get('why')}", "fenced")
                return
            if pull.scramble:
                self._rotate(pull.local_blocks)
            with self._lock:
                self._pulls.pop(key, None)
                self._finished.add(key)
                self._stats.transfers += 1
                self._stats.bytes += pull.nbytes
                self._stats.latency_s.append(pull.read_s)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for req in [r for r, d in self._leases.items() if d <= now]:
                self._release(req, "lease expired")
            late = [k for k, p in self._pulls.items() if p.ack_deadline and
                    p.ack_deadline <= now]
        for key in late:
            self._fail(key, "no answer from prefill after the read", "no_ack")

    def _rotate(self, blocks: list[int]) -> None:
        if len(blocks) < 2:
            return
        rolled = blocks[1:] + blocks[:1]
        for region in self.agent.layout.regions:
            region.view[blocks] = region.view[rolled].clone()
