"""Discovery in etcd: each agent's metadata under a lease, looked up by name.

Theory of operation
-------------------
Keys live under one namespace (default ``/kvxfer/``)::

    /kvxfer/agents/<name>  ->  Agent.metadata() bytes   (attached to the agent's lease)

``register`` grants a lease of ``ttl`` seconds, puts the key on it and starts one owned
thread that refreshes the lease every ``ttl / 3``. When the process dies (kill -9
included) nothing refreshes it and etcd deletes the key within ``ttl``; ``close()``
revokes the lease, so a clean exit leaves at once. A restart under the same name puts
metadata with a new incarnation id over the key (now on the new lease; the old lease's
expiry no longer touches it).

While etcd is unreachable every call raises :class:`~kvxfer.errors.DiscoveryUnavailable`
naming the endpoints; the registration thread keeps trying every second and, once etcd
answers again, refreshes its lease, or if the lease is gone (expired, or a new etcd)
grants another and puts the key again. Nothing here is on the path of a transfer.

The client is ``etcd3gw`` (etcd's JSON gateway over HTTP, no gRPC): a maintained
OpenStack library whose dependencies (requests, futurist, pbr) install on every
Python we support beside our pins; the gRPC clients pin protobuf / grpcio versions
that fight other packages, or are unmaintained. Several endpoints are tried in turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from kvxfer.errors import AgentClosed, BackendUnavailable, DiscoveryUnavailable, PeerNotFound
from ..logs import get_logger

log = get_logger(__name__)

AGENTS = "agents/"


def _parse(endpoint: str) -> tuple[str, str, int]:
    url = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"an etcd endpoint is http(s)://host:port, got {endpoint!r}")
    return url.scheme, url.hostname, url.port or 2379


class Etcd:
    """Agents' metadata in etcd, under leases; lookups, listing and a watch.

    Args:
        endpoints: one etcd client URL (``http://host:2379``) or several of one
            cluster, tried in order.
        namespace: key prefix of this deployment (ends with ``/``).
        ttl: lease of each registration, in seconds (whole seconds, at least 2): how
            long a dead agent stays listed.
        timeout: seconds one etcd request may take before the call fails.

    Raises:
        BackendUnavailable: etcd3gw is not installed (``pip install 'kvxfer[discovery]'``).
        ValueError: a bad endpoint, namespace or ttl.
    """

    def __init__(self, endpoints: str | Sequence[str], namespace: str = "/kvxfer/",
                 ttl: float = 10.0, timeout: float = 2.0) -> None:
        try:
            import etcd3gw
            import etcd3gw.exceptions
            import requests
        except ImportError as exc:
            raise BackendUnavailable("etcd discovery", str(exc), extra="discovery") from exc
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not urls:
            raise ValueError("Etcd needs at least one endpoint")
        if not namespace.endswith("/"):
            raise ValueError(f"namespace must end with '/', got {namespace!r}")
        if int(ttl) < 2:
            raise ValueError(f"ttl must be at least 2 s, got {ttl}")
        self.endpoints = urls
        self.namespace = namespace
        self.prefix = namespace + AGENTS
        self.ttl = int(ttl)
        self.timeout = float(timeout)
        self._parsed = [_parse(u) for u in urls]
        self._etcd3gw = etcd3gw
        self._errors: tuple[type[BaseException], ...] = (
            etcd3gw.exceptions.Etcd3Exception, requests.exceptions.RequestException)
        self._lock = threading.Lock()        # serialises requests on the shared clients
        self._clients = [self.new_client(i) for i in range(len(urls))]
        self._current = 0                    # the endpoint that answered last
        self._closed = False
        self._owned: list[Any] = []          # registrations and watches close() ends

    def new_client(self, index: int | None = None) -> Any:
        """A fresh etcd3gw client (own HTTP session) for an endpoint (default: the one
        that answered last); watches stream on one of their own."""
        scheme, host, port = self._parsed[self._current if index is None else index]
        return self._etcd3gw.Etcd3Client(host=host, port=port, protocol=scheme,
                                         timeout=self.timeout, api_path="/v3/")

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)`` on the first endpoint that answers.

        Raises:
            DiscoveryUnavailable: no endpoint answered, or etcd refused (says which).
            AgentClosed: after close().
        """
        if self._closed:
            raise AgentClosed("this Etcd discovery is closed")
        errors = []
        with self._lock:
            n = len(self._clients)
            for step in range(n):
                i = (self._current + step) % n
                try:
                    out = fn(self._clients[i])
                except self._errors as exc:
                    errors.append(f"{self.endpoints[i]}: {type(exc).__name__}: "
                                  f"{exc or 'cannot connect'}")
                    continue
                self._current = i
                return out
        raise DiscoveryUnavailable(f"etcd {what} failed, no endpoint answered: "
                                   + "; ".join(errors))

    # ------------------------------------------------------------ publishing

    def register(self, name: str, metadata: bytes | Callable[[], bytes]) -> Registration:
        """Publish ``metadata`` under ``name`` on a lease kept alive by a thread.

        Published before this returns if etcd answers; otherwise the failure is logged,
        kept in ``registration.error`` and retried every second.

        Args:
            name: the agent's name.
            metadata: its metadata bytes, or a callable returning them.

        Returns:
            The :class:`Registration`; ``close()`` withdraws the entry.
        """
        reg = Registration(self, name, metadata)
        self._owned.append(reg)
        return reg

    # ------------------------------------------------------------ lookups

    def lookup(self, name: str) -> bytes:
        """The metadata of the live agent called ``name``.

        Raises:
            PeerNotFound: no live agent of that name (never started, or its lease ended).
            DiscoveryUnavailable: etcd cannot be reached.
        """
        values = self.call("lookup", lambda c: c.get(self.prefix + name))
        if not values:
            raise PeerNotFound(f"no live agent {name!r} is registered in etcd under "
                               f"{self.prefix!r} (not started, or its lease expired)")
        return bytes(values[0])

    def peers(self) -> dict[str, bytes]:
        """Every live agent: name -> metadata.

        Raises:
            DiscoveryUnavailable: etcd cannot be reached.
        """
        rows = self.call("listing", lambda c: c.get_prefix(self.prefix))
        return {bytes(meta["key"]).decode()[len(self.prefix):]: bytes(value)
                for value, meta in rows}

    def watch(self, callback: Callable[[Any], None]) -> Any:
        """Report agents joining and leaving to ``callback(PeerEvent)``, from a thread.

        It first reports every agent already registered as a join. Across an etcd
        outage it reconnects and reports what changed meanwhile.

        Returns:
            A :class:`~kvxfer.discovery.etcd_watch.Watch`; ``close()`` stops it.
        """
        from kvxfer.discovery.etcd_watch import Watch
        w = Watch(self, callback)
        self._owned.append(w)
        return w

    def close(self) -> None:
        """Withdraw every registration, stop every watch. Idempotent."""
        if self._closed:
            return
        for owned in reversed(self._owned):
            owned.close()
        self._closed = True

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Etcd({self.endpoints}, namespace={self.namespace!r}, ttl={self.ttl})"


class Registration:
    """One agent's entry in etcd and the thread that keeps its lease alive.

    Made by :meth:`Etcd.register`. ``error`` is the last failure (None while
    published); ``wait_published(timeout)`` waits for the entry to be up.
    """

    RETRY_S = 1.0

    def __init__(self, etcd: Etcd, name: str, metadata: bytes | Callable[[], bytes]) -> None:
        self.etcd = etcd
        self.name = name
        self.key = etcd.prefix + name
        self._metadata = metadata if callable(metadata) else (lambda: metadata)
        self._lease_id: int | None = None            # thread (and constructor) only
        self._published = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        try:
            self._publish()
        except DiscoveryUnavailable as exc:
            self._fail(exc)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"kvxfer-etcd-lease[{name}]")
        self._thread.start()

    @property
    def published(self) -> bool:
        """Whether the entry was up at the last refresh."""
        return self._published.is_set()

    def wait_published(self, timeout: float) -> None:
        """Wait until the entry is in etcd.

        Raises:
            DiscoveryUnavailable: not published within ``timeout`` (says why).
        """
        if not self._published.wait(timeout):
            raise DiscoveryUnavailable(f"agent {self.name!r} is not published in etcd: "
                                       f"{self.error}")

    def _publish(self) -> None:
        etcd = self.etcd
        lease = etcd.call("lease grant", lambda c: c.lease(etcd.ttl))
        value = self._metadata()
        etcd.call("publish", lambda c: c.put(self.key, value, lease=lease))
        self._lease_id = lease.id
        if self.error is not None:
            log.info("agent %r is published in etcd again", self.name)
        self.error = None
        self._published.set()

    def _refresh(self) -> None:
        lease_id, etcd = self._lease_id, self.etcd
        if lease_id is None:
            self._publish()
            return
        left = etcd.call("lease keep-alive",
                         lambda c: etcd._etcd3gw.Lease(lease_id, c).refresh())
        if left <= 0:  # expired while we could not reach etcd, or a new cluster
            log.warning("the etcd lease of agent %r ended; publishing it again", self.name)
            self._lease_id = None
            self._publish()
        elif self.error is not None:
            log.info("agent %r reaches etcd again", self.name)
            self.error = None
        self._published.set()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            log.error("agent %r: %s (retrying every %.0f s; transfers are not affected)",
                      self.name, exc, self.RETRY_S)
        self.error = exc
        self._published.clear()

    def _run(self) -> None:
        period = max(0.5, self.etcd.ttl / 3)
        while not self._stop.wait(period if self.error is None else self.RETRY_S):
            try:
                self._refresh()
            except DiscoveryUnavailable as exc:
                self._fail(exc)
            except Exception as exc:  # pragma: no cover - a bug; keep the thread alive
                log.exception("etcd lease thread of %r", self.name)
                self._fail(exc)

    def close(self) -> None:
        """Stop refreshing and revoke the lease (the entry leaves at once). Idempotent;
        if etcd is down the entry leaves when its lease runs out."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.etcd.timeout * 3 + 5)
        lease_id, self._lease_id = self._lease_id, None
        self._published.clear()
        if lease_id is not None and not self.etcd._closed:
            try:
                self.etcd.call("lease revoke",
                               lambda c: self.etcd._etcd3gw.Lease(lease_id, c).revoke())
            except DiscoveryUnavailable as exc:
                log.warning("could not withdraw agent %r from etcd (%s); it leaves when "
                            "its lease ends", self.name, exc)


__all__ = ["AGENTS", "Etcd", "Registration"]
