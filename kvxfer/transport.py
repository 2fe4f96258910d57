"""Which transport really carries a peer's bytes: the report ``add_peer`` logs.

Operators are told to check the logs for the transport that carries the KV: RDMA
(InfiniBand / RoCE, NCCL's IB transport) is what a fabric is for; plain TCP on an RDMA
fabric is a misconfiguration that costs an order of magnitude. At ``add_peer`` the agent
asks this module for a one-line description of the new connection, stores it as
``peer.transport``, logs it at INFO and warns once per agent when an RDMA-capable
backend (ucx, nixl, nccl) ended up on TCP.

What each backend says:

- tcp: ``TCP 10.0.0.2:40112 -> 10.0.0.1:5600`` (the connection's own addresses).
- ucx: the endpoint's lanes as UCX chose them (``ucp_ep_print_info``), e.g.
  ``UCX lanes: rc_mlx5/mlx5_0:1 (am, rma_bw)``; on TCP when every data lane is tcp.
- nixl: NIXL's UCX plugin and the RDMA devices of this host (``/sys/class/infiniband``);
  on TCP when there are none or UCX_TLS excludes them (NIXL does not expose its lanes).
- nccl: host memory goes over Gloo, which is TCP; CUDA memory over NCCL, whose
  transport (NET/IB or NET/Socket) torch does not expose: said from the RDMA devices
  and ``NCCL_IB_DISABLE``; ``NCCL_DEBUG=INFO`` logs NCCL's own choice.
"""

from __future__ import annotations

import ctypes
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from .logs import get_logger

log = get_logger("kvxfer.transport")

RDMA_UCX = re.compile(r"^(rc|ud|dc|ib|rdmacm|srd|gga)", re.I)
SHARED_UCX = re.compile(r"^(sysv|posix|cma|knem|xpmem|cuda_ipc|rocm_ipc|self)", re.I)
_warned: "weakref.WeakSet[Any]" = weakref.WeakSet()


@dataclass(frozen=True)
class Transport:
    text: str  # what peer.transport holds
    rdma_on_tcp: bool  # an RDMA-capable backend whose bytes go over TCP


def rdma_devices() -> list[str]:
    """RDMA devices of this host (InfiniBand, RoCE, EFA): ``/sys/class/infiniband``."""
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def _sock_pair(sock: Any) -> str:
    try:
        here, there = sock.getsockname(), sock.getpeername()
        return f"{here[0]}:{here[1]} -> {there[0]}:{there[1]}"
    except (OSError, AttributeError, IndexError):
        return "(addresses unknown)"


def _libucp() -> Optional[ctypes.CDLL]:
    try:
        import libucx  # the wheel ucxx loads UCX from
        path = os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so")
        lib = ctypes.CDLL(path if os.path.exists(path) else "libucp.so")
    except (ImportError, OSError):
        return None
    lib.ucp_ep_print_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


def ucx_lanes(ep_handle: int) -> list[tuple[str, str]]:
    """(transport/device, roles) of each lane of a UCX endpoint, as UCX chose them."""
    ucp, libc = _libucp(), ctypes.CDLL(None)
    if ucp is None or not ep_handle:
        return []
    libc.open_memstream.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return []
    ucp.ucp_ep_print_info(ctypes.c_void_p(ep_handle), ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    text = ctypes.string_at(buf, size.value).decode(errors="replace")
    libc.free(buf)
    lanes = []
    for m in re.finditer(r"lane\[\d+\]:\s+\d+:(\S+)\s+md\[\d+\]\s+->\s+\S+\s+(.*)$", text, re.M):
        tl = m.group(1).rsplit(".", 1)[0]  # tcp/eth0.0 -> tcp/eth0
        roles = [w.split("#")[0] for w in m.group(2).split()
                 if w.split("#")[0] in ("am", "rma", "rma_bw", "amo", "tag", "keepalive",
                                        "wireup")]
        lanes.append((tl, ",".join(dict.fromkeys(roles))))
    return lanes


def _describe_ucx(conn: Any) -> Transport:
    ep = getattr(getattr(conn, "channel", None), "ep", None)
    lanes = ucx_lanes(getattr(ep, "handle", 0)) if ep is not None else []
    if not lanes:
        return Transport("UCX (lanes unknown: libucp not found)", False)
    merged: dict[str, list[str]] = {}
    for tl, roles in lanes:
        merged.setdefault(tl, []).extend(r for r in roles.split(",") if r)
    text = "UCX lanes: " + ", ".join(
        f"{tl} ({','.join(dict.fromkeys(r for r in roles if r not in ('wireup', 'keepalive'))) or 'control'})"
        for tl, roles in merged.items())
    data = [tl for tl, roles in lanes if {"am", "rma_bw", "rma", "tag"} & set(roles.split(","))]
    on_tcp = bool(data) and all(tl.startswith("tcp") for tl in data)
    return Transport(text + (" - TCP, no RDMA" if on_tcp else ""), on_tcp)


def _describe_nixl() -> Transport:
    devices = rdma_devices()
    tls = os.environ.get("UCX_TLS", "")
    if devices and not (tls and not any(RDMA_UCX.match(t) for t in tls.split(","))):
        return Transport(f"NIXL UCX plugin; RDMA devices here: {', '.join(devices)}", False)
    why = f"UCX_TLS={tls}" if devices else "no RDMA device on this host"
    # NIXL does not say where its peer is: TCP, or shared memory if it is on this host.
    return Transport(f"NIXL UCX plugin over TCP ({why}; shared memory with a peer on "
                     "this host)", True)


def _describe_nccl(backend: Any, conn: Any) -> Transport:
    sock = getattr(getattr(conn, "channel", None), "sock", None)
    if getattr(backend, "plane_kind", "") != "nccl":
        return Transport(f"Gloo over TCP {_sock_pair(sock)} (host memory)", True)
    devices = rdma_devices()
    if devices and os.environ.get("NCCL_IB_DISABLE", "0") != "1":
        return Transport(f"NCCL, NET/IB likely (RDMA devices: {', '.join(devices)}; "
                         "NCCL_DEBUG=INFO shows its choice)", False)
    return Transport("NCCL over NET/Socket (TCP): no RDMA device or NCCL_IB_DISABLE=1", True)


def describe(backend_name: str, backend: Any, conn: Any) -> Transport:
    """What carries the bytes of the connection ``conn`` of ``backend``."""
    try:
        if backend_name == "tcp":
            sock = getattr(getattr(conn, "channel", None), "sock", None)
            return Transport(f"TCP {_sock_pair(sock)}", False)
        if backend_name == "ucx":
            return _describe_ucx(conn)
        if backend_name == "nixl":
            return _describe_nixl()
        if backend_name == "nccl":
            return _describe_nccl(backend, conn)
    except Exception as exc:  # noqa: BLE001 - a report must never fail add_peer
        return Transport(f"{backend_name} (transport unknown: {exc})", False)
    return Transport(backend_name, False)


def report(agent: Any, peer: Any) -> None:
    """Set ``peer.transport``, log it (INFO), warn once per agent if RDMA fell to TCP."""
    t = describe(agent.backend_name, agent.backend, peer._conn)
    peer.transport = t.text
    log.info("agent %r -> peer %r over %s: %s", agent.name, peer.name, agent.backend_name,
             t.text)
    if t.rdma_on_tcp and agent not in _warned:
        _warned.add(agent)
        log.warning("agent %r: the %s backend carries KV over TCP, not RDMA (%s); check the "
                    "fabric (RDMA devices, UCX_TLS, NCCL_IB_DISABLE)", agent.name,
                    agent.backend_name, t.text)


def expected(backend_name: str) -> str:
    """What ``backend_name`` would use on this host, for ``kvxfer info``."""
    devices = rdma_devices()
    rdma = f"RDMA ({', '.join(devices)})" if devices else "TCP or shared memory (no RDMA device)"
    return {"tcp": "TCP",
            "ucx": f"UCX picks per peer: {rdma}",
            "nixl": f"NIXL UCX plugin: {rdma}",
            "nccl": "host memory: Gloo over TCP; CUDA memory: NCCL "
                    + ("NET/IB" if devices else "NET/Socket (TCP)")}.get(backend_name, "")


__all__ = ["Transport", "describe", "expected", "rdma_devices", "report", "ucx_lanes"]
