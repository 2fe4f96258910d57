"""The small interface every transport implements.

A backend moves the bytes of chunks between the registered memory of two agents. The
Agent owns everything above bytes: layouts, block ids, planning chunks, handles and
deadlines. A backend:

- binds where it listens when constructed and says how to reach it (``address``,
  ``backend_metadata``), which the Agent puts into its metadata bytes;
- ``start``s serving once a KV cache is registered: two-sided backends answer READ
  requests and place incoming WRITEs after ``memory.check`` accepted them; one-sided
  backends register the memory with their library;
- ``connect``s to a peer described by a :class:`PeerInfo` (one connection per peer,
  reused for every request) and ``submit``s handles to it, reporting each chunk with
  ``handle.chunk_done`` or the whole with ``handle.fail``;
- ``quiesce``s a failed or cancelled transfer: returns only once nothing the backend
  started for it can touch local memory any more (the Agent makes every handle's
  ``fail`` call it, so ``cancel`` and deadline failures keep that promise whatever the
  transport). Two-sided backends get this from the handle's ``data_lock``; one-sided
  ones wait, with a bound, for the operations they posted to finish or fail;
- keep one transfer's failure its own: a refused request, a cancelled one or a
  callback that raises leaves the other transfers to that peer running; only a dead
  connection fails them all, and it is then closed and freed;
- ``disconnect`` a peer it no longer needs (a peer re-added after a restart replaces
  its predecessor), failing that connection's transfers and freeing everything of it;
- ``close``s idempotently, failing what is pending and joining its threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from ..handle import TransferHandle
from ..layout import LayoutDescriptor
from ..memory import RegisteredMemory

# (peer name, stream key or None, error): an incoming write landed with bytes that fail
# the writer's checksum (one-sided backends check after landing; kvxfer.streams.Inbox).
CorruptSink = Callable[[str, "bytes | None", BaseException], None]

# (peer name, message) of a completed incoming write -> False when the receiver's unread
# notifications are full (the message was not taken: refuse the write, or hold it).
NotifySink = Callable[[str, bytes], bool]


@dataclass(frozen=True, slots=True)
class BackendConfig:
    chunk_bytes: int = 4 << 20  # payload of one chunk
    max_inflight: int = 4  # chunks outstanding per peer connection
    connect_timeout: float = 10.0  # seconds to reach a peer and finish the hello
    staged: bool = False  # send host memory through staging buffers too (tests the GPU path)
    # Bytes all staging buffers of the backend hold together (None: no limit). Sends wait
    # for room; receives in progress may pass it by one chunk each.
    transfer_buffer_bytes: int | None = None
    # Shared secret every peer must prove it knows (kvxfer.auth); None: no authentication.
    secret: bytes | None = field(default=None, repr=False)
    hello_timeout: float = 5.0  # seconds a connecting peer has to finish its handshake
    max_connections: int = 1024  # peers served at once; more are refused (E_CLOSING)
    max_handshakes: int = 256  # connections handshaking at once; past it the oldest goes
    compression: str = "none"  # "none", "lz4", "zstd" or "auto" (two-sided backends)
    checksum: bool = False  # an xxh3-64 of every chunk, checked before it is placed

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.max_inflight < 1 or self.connect_timeout <= 0 \
                or self.hello_timeout <= 0 or self.max_connections < 1 \
                or self.max_handshakes < 1 \
                or (self.transfer_buffer_bytes is not None
                    and self.transfer_buffer_bytes < self.chunk_bytes):
            raise ValueError(f"invalid backend config: {self}")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    name: str
    backend: str
    address: str  # where its backend listens ("host:port" for TCP)
    descriptor: LayoutDescriptor
    backend_metadata: bytes  # opaque to the Agent (a NIXL agent's metadata, say)


class BackendPeer(ABC):
    """A backend's connection to one peer."""

    name: str

    @property
    @abstractmethod
    def alive(self) -> bool: ...


class Backend(ABC):
    """Base class of transports; see the module docstring for the contract."""

    name: ClassVar[str]
    one_sided: ClassVar[bool]

    def __init__(self, agent_name: str, listen: str, config: BackendConfig) -> None:
        self.agent_name = agent_name
        self.listen = listen
        self.config = config
        # Set by the Agent: where a backend that verifies incoming writes after they
        # landed (nixl) reports one that fails its checksum.
        self.on_corrupt: CorruptSink | None = None

    @abstractmethod
    def start(self, memory: RegisteredMemory, notify: NotifySink) -> None: ...

    @abstractmethod
    def address(self) -> str: ...

    def backend_metadata(self) -> bytes:
        return b""

    @abstractmethod
    def connect(self, peer: PeerInfo) -> BackendPeer: ...

    @abstractmethod
    def submit(self, peer: BackendPeer, handle: TransferHandle) -> None: ...

    @abstractmethod
    def quiesce(self, handle: TransferHandle) -> None:
        """Return once nothing started for ``handle`` (no longer active) can touch local
        memory; called by ``handle.fail`` from any thread, never under a backend lock."""

    @abstractmethod
    def disconnect(self, peer: BackendPeer, why: BaseException) -> None:
        """Fail the connection's transfers with ``why`` and free all of it. Idempotent."""

    @abstractmethod
    def close(self) -> None: ...


def parse_host_port(address: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port")."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be 'host:port', got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
