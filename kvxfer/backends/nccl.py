"""NCCL backend: kvxfer frames over TCP, payloads over ``torch.distributed`` process groups.

Theory of operation
-------------------
Two-sided, like TCP and UCX, and sharing their machinery (:mod:`.twosided`): requests,
chunks, credits, serving, cancel and failure isolation are theirs. This module adds a
data plane beside the control socket (the channel is :mod:`.nccl_channel`)::

    agent A (connects)                                  agent B (serves)
    TCP socket  key, HELLO, READ/WRITE/DATA/... -------> TCP listener (as tcp)
    TCPStore client --- rendezvous under the key ------> TCPStore master (port in
                                                         B's metadata, bound where B
                                                         listens)
    rank 1 of "c2s" and "s2c" <===== payloads =========> rank 0 of both
            ProcessGroupNCCL for CUDA memory, ProcessGroupGloo for host memory

- No global ``init_process_group``: every connection forms its own two groups (one per
  direction) with ``PrefixStore(key)`` on the serving agent's TCPStore, once, right
  after the HELLO; they live as long as the connection (the peer's life) and are
  destroyed with it. A group that cannot form fails ``add_peer`` with PeerUnreachable.
- CUDA memory (ProcessGroupNCCL): chunks are packed on the device by the packing
  kernel into a device staging buffer and sent with send/recv; nothing goes through
  host memory. NCCL matches in posting order, which the channel keeps strict. NCCL
  refuses two ranks on one GPU, so a peer on our own device is refused up front.
- Host memory (ProcessGroupGloo): the same path with host staging buffers and Gloo
  tags, which is what CI runs (every step but the NCCL library call). Gloo devices
  bind the address the control socket uses, so the data plane takes the route the
  control connection took (one device per local address, shared by the connections).
- Up to ``max_inflight`` chunks are outstanding per connection, as for every two-sided
  backend; each direction moves one payload at a time, in frame order.
- Failure: a dead peer closes the groups' sockets and the waiting send or receive fails
  at once; a stalled one is bounded by ``payload_timeout`` (the connect timeout: how
  long a payload may take once its frame is out), after which the connection ends
  (NCCL: its communicators are aborted; the next connection builds new ones). Handles
  fail at their own deadline regardless, and other peers are untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import secrets
import socket
from typing import Any, Optional

import torch

from ..errors import BackendUnavailable, PeerUnreachable
from ..memory import RegisteredMemory
from ..protocol import Connection
from .base import BackendConfig, NotifySink, PeerInfo, parse_host_port
from .nccl_channel import KEY_BYTES, DataPlane, NcclChannel
from .tcp import TcpBackend
from .twosided import Channel

try:
    import torch.distributed as dist
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore
except ImportError as exc:  # a torch built without distributed support
    raise ImportError(f"torch.distributed is not available in this torch build: {exc}",
                      name="torch.distributed") from exc
if not dist.is_available():
    raise ImportError("torch.distributed is not available in this torch build",
                      name="torch.distributed")

GLOO, NCCL = "gloo", "nccl"
SAME_GPU = ("NCCL refuses two ranks on one GPU; use backend 'ucx' (CUDA IPC) or 'nixl' "
            "for transfers within one device")


def nccl_usable() -> bool:
    """ProcessGroupNCCL exists in this torch and a CUDA device is visible."""
    return dist.is_nccl_available() and torch.cuda.is_available()


def _gpu_id(device: torch.device) -> str:
    """A name of the GPU that is the same in every process using it (its UUID)."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else \
        f"{socket.gethostname()}/{getattr(props, 'pci_bus_id', device.index)}"


class NcclBackend(TcpBackend):
    """kvxfer over torch.distributed process groups (NCCL for CUDA memory, Gloo for host
    memory), with a TCP control connection per peer; see the module docstring."""

    name = "nccl"
    prefix_len = KEY_BYTES  # the connecting side's rendezvous key comes first

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        # A process group moves one tensor per message: every chunk is packed first.
        super().__init__(agent_name, listen, dataclasses.replace(config, staged=True))
        self.payload_timeout = config.connect_timeout
        self.plane_kind: Optional[str] = None  # GLOO or NCCL, chosen at start
        self._gpu: Optional[str] = None  # our GPU's id (NCCL)
        self._devices: dict[str, Any] = {}  # local address -> Gloo device (under _lock)
        host = self._lsock.getsockname()[0]
        store_sock: Optional[socket.socket] = None
        try:
            store_sock = socket.create_server((host, 0))  # bound where we listen, not *
            self._store_port = store_sock.getsockname()[1]
            self._store_host = "127.0.0.1" if host in ("0.0.0.0", "") else \
                "::1" if host == "::" else host
            self._store: Any = TCPStore(host, self._store_port, is_master=True,
                                        wait_for_workers=False,
                                        master_listen_fd=store_sock.fileno(),
                                        timeout=self._timedelta())
            store_sock.detach()  # the store owns the socket now and closes it
        except (OSError, RuntimeError) as exc:
            if store_sock is not None and store_sock.fileno() >= 0:
                store_sock.close()
            self._lsock.close()
            raise PeerUnreachable(f"cannot start the rendezvous store on {host}: {exc}") \
                from exc

    @staticmethod
    def describe(cuda: bool) -> str:
        """What ``kvxfer info`` says of this backend here."""
        if cuda and dist.is_nccl_available():
            major, minor, patch = torch.cuda.nccl.version()
            return f"CUDA memory via NCCL {major}.{minor}.{patch}; host memory via Gloo"
        if cuda:
            return "host memory via Gloo; this torch has no ProcessGroupNCCL"
        return "host memory only: no CUDA device here; host memory via Gloo"

    def _timedelta(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.payload_timeout)

    # ---------------------------------------------------------------- serving
    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None:
        if memory.is_host:
            self.plane_kind = GLOO
        elif nccl_usable():
            self.plane_kind = NCCL
            self.staging_device = memory.layout.device  # packed on the device, sent from it
            self._gpu = _gpu_id(memory.layout.device)
        else:
            raise BackendUnavailable(self.name, "the KV cache is in CUDA memory but this "
                                     "torch has no ProcessGroupNCCL")
        super().start(memory, notify)

    def backend_metadata(self) -> bytes:
        return json.dumps({"store_port": self._store_port,
                           "plane": self.plane_kind, "gpu": self._gpu}).encode()

    def _server_channel(self, sock: socket.socket, conn: Connection, prefix: bytes) -> Channel:
        """A peer finished its handshake: serve it over an NcclChannel on its socket
        (``prefix``: its rendezvous key, read by the gate before the HELLO)."""
        return NcclChannel(sock, prefix, lambda key, s: self._form(key, s, rank=0), conn)

    # ------------------------------------------------------------- connecting
    def _open_channel(self, peer: PeerInfo) -> Channel:
        try:
            meta = json.loads(peer.backend_metadata)
            store = (parse_host_port(peer.address)[0], int(meta["store_port"]))
            plane, gpu = meta["plane"], meta["gpu"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerUnreachable(f"peer {peer.name!r} sent malformed nccl metadata: {exc}") \
                from exc
        if plane != self.plane_kind:
            raise PeerUnreachable(f"peer {peer.name!r} moves {plane} payloads, this agent "
                                  f"{self.plane_kind}: both KV caches must be on GPUs (NCCL) "
                                  "or both in host memory (Gloo)")
        if plane == NCCL and gpu == self._gpu:
            raise PeerUnreachable(f"peer {peer.name!r} uses this agent's GPU ({gpu}): "
                                  f"{SAME_GPU}")
        sock = super()._open_channel(peer).sock  # type: ignore[attr-defined]
        key = secrets.token_hex(KEY_BYTES // 2).encode()
        try:
            sock.sendall(key)
        except OSError as exc:
            sock.close()
            raise PeerUnreachable(f"cannot reach peer {peer.name!r}: {exc}") from exc
        return NcclChannel(sock, key, lambda k, s: self._form(k, s, rank=1, store=store))

    def _form(self, key: bytes, sock: socket.socket, rank: int,
              store: Optional[tuple[str, int]] = None) -> DataPlane:
        """Form this connection's two groups with the peer and move a byte each way.

        Raises:
            PeerUnreachable: the groups did not form within the connect timeout.
        """
        groups: list[Any] = []
        try:
            # A client of its own per connection, ours included: a TCPStore client
            # serialises its waits, so a peer that never joins would hold up the
            # rendezvous of every other connection through a shared one.
            host, port = store or (self._store_host, self._store_port)
            base = TCPStore(host, port, is_master=False, timeout=self._timedelta())
            for direction in ("c2s", "s2c"):
                prefix = PrefixStore(f"kvxfer/{key.hex()}/{direction}", base)
                groups.append(self._group(prefix, rank, sock))
        except (RuntimeError, OSError, ValueError) as exc:
            raise PeerUnreachable(f"the process groups with the peer did not form: "
                                  f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        c2s, s2c = groups
        device = self.staging_device or torch.device("cpu")
        plane = DataPlane(c2s if rank else s2c, s2c if rank else c2s, 1 - rank,
                          self.payload_timeout, device)
        probe = torch.zeros(1, dtype=torch.uint8, device=device)
        try:  # connects both groups now (NCCL builds its communicators lazily)
            for step in ((plane.send, plane.recv) if rank else (plane.recv, plane.send)):
                step(probe)
        except PeerUnreachable as exc:
            plane.close()
            raise PeerUnreachable(f"the process groups with the peer formed but carry "
                                  f"nothing: {exc}") from exc
        return plane

    def _group(self, store: Any, rank: int, sock: socket.socket) -> Any:
        if self.plane_kind == NCCL:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timedelta()
            with torch.cuda.device(self.staging_device):
                return dist.ProcessGroupNCCL(store, rank, 2, opts)
        opts = ProcessGroupGloo._Options()
        opts._devices = [self._gloo_device(sock.getsockname()[0])]
        opts._timeout = self._timedelta()
        opts._threads = 1  # send and recv run on the caller's thread; collectives unused
        return ProcessGroupGloo(store, rank, 2, opts)

    def _gloo_device(self, address: str) -> Any:
        """The Gloo device bound to ``address``, made on first use and then shared."""
        with self._lock:
            device = self._devices.get(address)
            if device is None:
                device = self._devices[address] = ProcessGroupGloo.create_device(
                    hostname=address)
            return device

    def _release(self) -> None:
        super()._release()
        self._store = None  # stops the rendezvous server and closes its socket
        with self._lock:
            self._devices.clear()

