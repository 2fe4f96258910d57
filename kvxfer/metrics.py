"""Prometheus metrics of KV transfers and of the prefix index (``pip install 'kvxfer[metrics]'``).

Theory of operation
-------------------
An :class:`Agent` made with ``metrics=True`` (the process-wide registry) or
``metrics=<CollectorRegistry>`` holds a :class:`KVMetrics` and calls its :meth:`track`
once per transfer it hands to a backend. ``track`` raises the in-flight gauge and adds
a done-callback to the handle; the callback (on whichever thread finished the transfer)
lowers the gauge and either observes the latency and counts the bytes, or counts the
failure under its cause. An agent without metrics keeps ``None`` and pays one
``is None`` test per transfer (``benchmarks/bench_metrics.py`` measures it).

A :class:`~kvxfer.prefix.PrefixIndex` made with ``metrics=`` counts every ``match`` /
``overlap``: requested blocks, the longest prefix any worker holds (hit blocks), and the
hit ratio of all lookups so far.

Labels are ``backend`` and ``op`` (``read``/``write``), plus ``cause`` on failures; no
per-request or per-peer label, so the series count stays fixed::

    kvxfer_kv_transfer_latency_seconds{backend,op}     histogram, fine below 10 ms
    kvxfer_kv_transfer_bytes_total{backend,op}         KV payload bytes moved
    kvxfer_kv_transfer_wire_bytes_total{backend,op}    bytes on the wire after the codec
                                                       (no codec yet: equal to the above)
    kvxfer_kv_transfer_failures_total{backend,op,cause}  timeout, cancelled, peer_unreachable,
                                                       remote, agent_closed, other
    kvxfer_kv_transfers_inflight{backend,op}           gauge
    kvxfer_prefix_lookups_total, kvxfer_prefix_requested_blocks_total,
    kvxfer_prefix_hit_blocks_total                     counters
    kvxfer_kv_cache_hit_ratio                          gauge: hit / requested blocks so far

:func:`serve` exposes a registry over HTTP (``/metrics``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import (AgentClosed, BackendUnavailable, PeerUnreachable, RemoteError,
                     TransferTimeout)

if TYPE_CHECKING:  # pragma: no cover
    from .handle import TransferHandle

# Seconds. Fine steps below 10 ms (the deployment guides alert on P99 > 10 ms), coarse above.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004,
                   0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.0125, 0.015, 0.02, 0.03, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CAUSES = ("timeout", "cancelled", "peer_unreachable", "remote", "agent_closed", "other")


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise BackendUnavailable("metrics", f"prometheus-client is not installed ({exc})",
                                 extra="metrics") from exc
    return prometheus_client


def failure_cause(handle: "TransferHandle") -> str:
    """The ``cause`` label of a failed or cancelled transfer (one of :data:`CAUSES`)."""
    if handle.status == "cancelled":
        return "cancelled"
    err = handle.error
    root = getattr(err, "cause", None) or err
    for kind, label in ((TransferTimeout, "timeout"), (PeerUnreachable, "peer_unreachable"),
                        (RemoteError, "remote"), (AgentClosed, "agent_closed")):
        if isinstance(err, kind) or isinstance(root, kind):
            return label
    return "other"


class KVMetrics:
    """The kvxfer collectors, registered once on one registry.

    Use :func:`metrics_for` to get the instance of a registry (collectors of the same
    name cannot be registered twice); every agent and index of a process may share it.
    """

    def __init__(self, registry: Any) -> None:
        prom = _client()
        self.registry = registry
        labels = ("backend", "op")
        kw = {"registry": registry}
        self.latency = prom.Histogram(
            "kvxfer_kv_transfer_latency_seconds", "Time from submitting a KV transfer to "
            "its completion", labels, buckets=LATENCY_BUCKETS, **kw)
        self.bytes = prom.Counter("kvxfer_kv_transfer_bytes", "KV payload bytes moved by "
                                  "completed transfers", labels, **kw)
        self.wire_bytes = prom.Counter("kvxfer_kv_transfer_wire_bytes", "Bytes of completed "
                                       "transfers on the wire after the codec", labels, **kw)
        self.failures = prom.Counter("kvxfer_kv_transfer_failures", "KV transfers that "
                                     "failed or were cancelled", labels + ("cause",), **kw)
        self.inflight = prom.Gauge("kvxfer_kv_transfers_inflight", "KV transfers submitted "
                                   "and not yet done", labels, **kw)
        self.lookups = prom.Counter("kvxfer_prefix_lookups", "Prefix-index lookups", **kw)
        self.requested_blocks = prom.Counter("kvxfer_prefix_requested_blocks", "Blocks "
                                             "named by prefix-index lookups", **kw)
        self.hit_blocks = prom.Counter("kvxfer_prefix_hit_blocks", "Leading blocks some "
                                       "worker held, summed over lookups", **kw)
        self.hit_ratio = prom.Gauge("kvxfer_kv_cache_hit_ratio", "Hit blocks / requested "
                                    "blocks over every prefix-index lookup so far", **kw)
        self._lock = threading.Lock()
        self._requested = 0
        self._hit = 0

    # ------------------------------------------------------------ transfers
    def track(self, handle: "TransferHandle", backend: str) -> None:
        """Count ``handle`` in flight now, and its outcome when it is done."""
        op = handle.op
        inflight = self.inflight.labels(backend, op)
        inflight.inc()
        start = time.perf_counter()

        def done(h: "TransferHandle") -> None:
            inflight.dec()
            if h.status == "done":
                self.latency.labels(backend, op).observe(time.perf_counter() - start)
                self.bytes.labels(backend, op).inc(h.nbytes)
                self.wire_bytes.labels(backend, op).inc(h.nbytes)
            else:
                self.failures.labels(backend, op, failure_cause(h)).inc()

        handle.add_done_callback(done)

    # --------------------------------------------------------------- prefix
    def lookup(self, requested: int, hit: int) -> None:
        """Count one prefix-index lookup of ``requested`` blocks, ``hit`` of them held."""
        self.lookups.inc()
        self.requested_blocks.inc(requested)
        self.hit_blocks.inc(hit)
        with self._lock:
            self._requested += requested
            self._hit += hit
            ratio = self._hit / self._requested if self._requested else 0.0
        self.hit_ratio.set(ratio)


_by_registry: dict[int, KVMetrics] = {}
_by_registry_lock = threading.Lock()


def metrics_for(metrics: Union[bool, Any, None]) -> Optional[KVMetrics]:
    """Resolve an ``Agent(metrics=...)`` / ``PrefixIndex(metrics=...)`` argument.

    Args:
        metrics: None or False (off), True (prometheus_client's default registry), a
            ``CollectorRegistry``, or a :class:`KVMetrics`.

    Returns:
        The registry's KVMetrics, or None when off.

    Raises:
        BackendUnavailable: prometheus-client is missing (extra ``metrics``).
    """
    if metrics is None or metrics is False:
        return None
    if isinstance(metrics, KVMetrics):
        return metrics
    registry = _client().REGISTRY if metrics is True else metrics
    with _by_registry_lock:
        found = _by_registry.get(id(registry))
        if found is None or found.registry is not registry:
            found = _by_registry[id(registry)] = KVMetrics(registry)
        return found


class MetricsServer:
    """The HTTP endpoint :func:`serve` started; ``close()`` stops it and joins its thread."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]
        self._closed = False

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(port: int = 0, addr: str = "0.0.0.0", registry: Any = None) -> MetricsServer:
    """Serve ``registry`` (default: the process-wide one) at ``http://addr:port/metrics``.

    Args:
        port: TCP port; 0 picks a free one (see ``.port``).
        addr: address to bind.
        registry: a ``CollectorRegistry``; default prometheus_client's REGISTRY.

    Returns:
        A :class:`MetricsServer`; ``close()`` stops it.

    Raises:
        BackendUnavailable: prometheus-client is missing (extra ``metrics``).
        OSError: the port cannot be bound.
    """
    prom = _client()
    server, thread = prom.start_http_server(port, addr=addr,
                                            registry=registry or prom.REGISTRY)
    return MetricsServer(server, thread)


__all__ = ["CAUSES", "KVMetrics", "LATENCY_BUCKETS", "MetricsServer", "failure_cause",
           "metrics_for", "serve"]
