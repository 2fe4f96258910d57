"""A watch on the agents in etcd: joins and leaves, across etcd outages.

Theory of operation
-------------------
One owned thread loops::

    snapshot: range over the prefix -> {name: metadata} and the store's revision;
              diff against what was reported: leaves, then joins (changed metadata =
              a restart: leave of the old incarnation, join of the new)
    stream:   POST /v3/watch from revision + 1 on its own HTTP connection; each PUT /
              DELETE updates the map and is reported as it comes
    on error: (etcd down, stream cut, history compacted) wait, snapshot again

so an outage costs nothing but time: what changed meanwhile is reported when etcd
answers again. ``close()`` shuts the stream's socket down, which wakes the thread.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

from kvxfer.discovery.events import JOIN, LEAVE, PeerEvent, incarnation_of
from kvxfer.errors import DiscoveryUnavailable
from ..logs import get_logger

log = get_logger(__name__)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _range_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Watch:
    """Reports agents joining and leaving; made by :meth:`Etcd.watch`.

    ``error`` is the last failure while etcd is unreachable (None when watching).
    """

    RETRY_S = 0.5
    READ_TIMEOUT_S = 15.0  # an idle stream is re-opened this often (cheap)

    def __init__(self, etcd: Any, callback: Callable[[PeerEvent], None]) -> None:
        self.etcd = etcd
        self.callback = callback
        self.error: BaseException | None = None
        self._prefix = etcd.prefix.encode()
        self._known: dict[str, bytes] = {}    # thread only: what was reported
        self._stop = threading.Event()
        self._resp: Any = None                # the open stream, for close()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="kvxfer-etcd-watch")
        self._thread.start()

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the registered agents have been reported once."""
        return self._synced.wait(timeout)

    def close(self) -> None:
        """Stop the thread and join it. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._cut()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ------------------------------------------------------------ thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                revision = self._snapshot()
                self._synced.set()
                if self.error is not None:
                    log.info("etcd watch is back")
                self.error = None
                self._stream(revision + 1)
            except (DiscoveryUnavailable, *self.etcd._errors, OSError, ValueError,
                    KeyError) as exc:  # KeyError, ValueError: a reply we cannot read
                if self._stop.is_set():
                    break
                if self.error is None:
                    log.warning("etcd watch interrupted (%s: %s); retrying", type(exc).__name__,
                                exc)
                self.error = exc
                self._stop.wait(self.RETRY_S)

    def _snapshot(self) -> int:
        body = {"key": _b64(self._prefix), "range_end": _b64(_range_end(self._prefix))}
        out = self.etcd.call("watch snapshot",
                             lambda c: c.post(c.get_url("/kv/range"), json=body))
        now = {base64.b64decode(kv["key"])[len(self._prefix):].decode():
               base64.b64decode(kv.get("value", "")) for kv in out.get("kvs", [])}
        for name in [n for n in self._known if n not in now]:
            self._leave(name)
        for name, value in now.items():
            self._put(name, value)
        return int(out["header"]["revision"])

    def _stream(self, start: int) -> None:
        client = self.etcd.new_client()
        request = {"create_request": {"key": _b64(self._prefix),
                                      "range_end": _b64(_range_end(self._prefix)),
                                      "start_revision": start}}
        try:
            resp = client.session.post(client.get_url("/watch"), json=request, stream=True,
                                       timeout=(self.etcd.timeout, self.READ_TIMEOUT_S))
            self._resp = resp
            if self._stop.is_set():
                return
            resp.raise_for_status()
            for line in resp.iter_lines():
                if self._stop.is_set():
                    return
                if line.strip():
                    if not self._on_line(json.loads(line)):
                        return
        finally:
            self._resp = None
            client.session.close()

    def _on_line(self, chunk: dict) -> bool:
        result = chunk.get("result") or {}
        if "error" in chunk or result.get("canceled") or result.get("compact_revision"):
            log.info("etcd watch cancelled (%s); taking a new snapshot",
                     chunk.get("error") or result.get("cancel_reason") or "compacted")
            return False
        for event in result.get("events", []):
            kv = event["kv"]
            name = base64.b64decode(kv["key"])[len(self._prefix):].decode()
            if event.get("type") == "DELETE":
                self._leave(name)
            else:
                self._put(name, base64.b64decode(kv.get("value", "")))
        return True

    # ------------------------------------------------------------ reports

    def _put(self, name: str, value: bytes) -> None:
        old = self._known.get(name)
        if old == value:
            return
        if old is not None:
            self._leave(name)
        self._known[name] = value
        self._report(PeerEvent(JOIN, name, value, incarnation_of(value)))

    def _leave(self, name: str) -> None:
        old = self._known.pop(name, None)
        if old is not None:
            self._report(PeerEvent(LEAVE, name, old, incarnation_of(old)))

    def _report(self, event: PeerEvent) -> None:
        try:
            self.callback(event)
        except Exception:
            log.exception("discovery watch callback failed on %s", event)

    def _cut(self) -> None:
        resp = self._resp
        if resp is None:
            return
        try:
            sock = socket.socket(fileno=resp.raw.fileno())  # not ours to close: detach
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()
        except (OSError, AttributeError, ValueError):
            pass


__all__ = ["Watch"]
