"""``kvxfer bench``: KV-block transfer latency and bandwidth, per backend, against raw TCP.

Theory of operation
-------------------
Two processes: a *server* that holds a KV cache and a *runner* that moves blocks to or
from it. Locally the runner spawns the server itself (``kvxfer bench``); across two
machines one runs ``kvxfer bench serve --listen HOST:PORT`` and the other
``kvxfer bench run --connect HOST:PORT``. Everything the two exchange goes over that
one control connection, as JSON lines::

    runner                                   server
      {"op": "setup", backend, geometry} ──▶  Agent(backend, listen=HOST:0) + KV cache
                          ◀── {"metadata"}    (hex of agent.metadata())
      {"op": "peer", metadata} ────────────▶  add_peer(runner)   (both sides know both)
      ... agent.read / agent.write, timed by the runner ...
      {"op": "digest", blocks} ────────────▶  sha256 of those blocks: the bytes are checked
      {"op": "baseline"} ──────────────────▶  a plain socket on HOST:0 that sinks or
                          ◀── {"port"}        sources N bytes per request (the raw column)
      {"op": "teardown"} ──────────────────▶  agent closed

Each backend is measured in turn over the same sweep of request sizes (blocks per
request). Per size: ``warmup`` requests, then ``iters`` requests with ``inflight`` of
them outstanding; a request's latency runs from its submission to its done-callback;
GB/s is the measured requests' bytes over their wall time. Each slot of ``inflight``
uses its own range of blocks on both sides, in random or contiguous order. The raw
baseline moves the same bytes per request over one plain socket, one request at a time,
from and into one contiguous buffer: what the link gives with no KV layout at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterator, Optional, Sequence

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "fp8": "uint8"}


@dataclass(frozen=True)
class Geometry:
    """KV-cache shape of one model: what one block holds."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "bfloat16"
    mla_latent_dim: int = 0  # > 0: MLA, one latent per token per layer

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over every layer (K and V)."""
        size = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}[self.dtype]
        per_token = (self.mla_latent_dim if self.mla_latent_dim
                     else 2 * self.kv_heads * self.head_dim)
        return self.layers * self.block_size * per_token * size

    def describe(self) -> str:
        heads = (f"MLA latent {self.mla_latent_dim}" if self.mla_latent_dim
                 else f"{self.kv_heads} KV heads x {self.head_dim}")
        return (f"{self.name}: {self.layers} layers, {heads}, {self.dtype}, blocks of "
                f"{self.block_size} tokens = {self.block_bytes / 2**20:.3g} MiB")


def models() -> dict[str, Geometry]:
    """Geometries of public models, from the package's ``kv_shapes.json``."""
    raw = json.loads(resources.files("kvxfer").joinpath("kv_shapes.json").read_text())
    out = {}
    for name, g in raw.items():
        if name.startswith("_"):
            continue
        if g.get("mla"):
            out[name] = Geometry(name, g["layers"], 1, g["latent_dim"], 64, g["dtype"],
                                 g["latent_dim"])
        else:
            out[name] = Geometry(name, g["layers"], g["kv_heads"], g["head_dim"],
                                 dtype=g["dtype"])
    return out


def build_cache(geo: Geometry, num_blocks: int, seed: int, device: str = "cpu") -> Any:
    """A vLLM NHD (or MLA) cache of ``num_blocks`` blocks holding bytes drawn from seed."""
    import torch

    import kvxfer

    dtype = getattr(torch, DTYPES[geo.dtype])
    gen = torch.Generator().manual_seed(seed)
    if geo.mla_latent_dim:
        shape: tuple[int, ...] = (num_blocks, geo.block_size, geo.mla_latent_dim)
    else:
        shape = (2, num_blocks, geo.block_size, geo.kv_heads, geo.head_dim)
    tensors = []
    for _ in range(geo.layers):
        t = torch.empty(shape, dtype=dtype)
        raw = t.view(torch.uint8).view(-1)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
        tensors.append(t.to(device))
    if geo.mla_latent_dim:
        return kvxfer.KVLayout.mla(tensors)
    return kvxfer.KVLayout.vllm(tensors, kv_layout="NHD")


def block_digest(layout: Any, blocks: Sequence[int]) -> str:
    """sha256 of the given blocks' bytes, every region in order: the same on both sides
    exactly when the blocks hold the same bytes."""
    import torch

    h = hashlib.sha256()
    for region in layout.regions:
        h.update(region.view[list(blocks)].contiguous().cpu().view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ control
class Control:
    """One JSON line per message over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rfile = sock.makefile("rb")

    def send(self, **msg: Any) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> Optional[dict]:
        line = self._rfile.readline()
        return json.loads(line) if line else None

    def call(self, **msg: Any) -> dict:
        self.send(**msg)
        reply = self.recv()
        if reply is None:
            raise ConnectionError("the bench server closed the control connection")
        if "error" in reply:
            raise RuntimeError(f"bench server: {reply['error']}")
        return reply

    def close(self) -> None:
        self._rfile.close()
        self.sock.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


class _RawSink:
    """The server's end of the raw-socket baseline: one connection, requests of
    ``b"w" + size`` (receive size bytes, answer one byte) or ``b"r" + size`` (send them)."""

    def __init__(self, host: str) -> None:
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, name="kvxfer-bench-raw", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        buf = bytearray(0)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = bytearray(9)
            while _recv_exact(conn, memoryview(head)):
                size = int.from_bytes(head[1:], "big")
                if len(buf) < size:
                    buf = bytearray(size)
                if head[:1] == b"w":
                    if not _recv_exact(conn, memoryview(buf)[:size]):
                        return
                    conn.sendall(b"k")
                else:
                    conn.sendall(memoryview(buf)[:size])

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=10)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def serve(listen: str, once: bool = False, out: Any = None) -> int:
    """Run the bench server: answer runners on ``listen`` (HOST:PORT) until stopped.

    Prints ``listening HOST:PORT`` first (port 0 is resolved), then one line per session.
    """
    out = out or sys.stdout
    host, port = _split(listen)
    with socket.create_server((host, port)) as listener:
        print(f"listening {host}:{listener.getsockname()[1]}", file=out, flush=True)
        while True:
            conn, peer = listener.accept()
            with conn:
                ServerSession(Control(conn), conn.getsockname()[0]).run()
            print(f"session with {peer[0]} done", file=out, flush=True)
            if once:
                return 0


class ServerSession:
    """The server's side of one runner's session."""

    def __init__(self, ctl: Control, host: str) -> None:
        self.ctl, self.host = ctl, host
        self.agent: Any = None
        self.layout: Any = None
        self.sinks: list[_RawSink] = []

    def run(self) -> None:
        try:
            while (msg := self.ctl.recv()) is not None:
                try:
                    reply = getattr(self, "_" + msg.pop("op"))(**msg)
                except Exception as exc:  # noqa: BLE001 - reported to the runner
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                self.ctl.send(**reply)
        finally:
            self._teardown()
            for sink in self.sinks:
                sink.close()

    def _setup(self, backend: str, geometry: dict, num_blocks: int, device: str,
               seed: int) -> dict:
        import kvxfer

        self._teardown()
        self.layout = build_cache(Geometry(**geometry), num_blocks, seed, device)
        self.agent = kvxfer.Agent(f"bench-server-{backend}", backend=backend,
                                  listen=f"{self.host}:0")
        self.agent.register_kv_cache(self.layout)
        return {"metadata": self.agent.metadata().hex()}

    def _peer(self, metadata: str) -> dict:
        peer = self.agent.add_peer(bytes.fromhex(metadata))
        return {"transport": getattr(peer, "transport", "")}

    def _digest(self, blocks: list[int]) -> dict:
        return {"digest": block_digest(self.layout, blocks)}

    def _baseline(self) -> dict:
        sink = _RawSink(self.host)
        self.sinks.append(sink)
        return {"port": sink.port}

    def _teardown(self) -> dict:
        if self.agent is not None:
            self.agent.close()
        self.agent = self.layout = None
        return {}


# ------------------------------------------------------------------- runner
@dataclass
class BenchConfig:
    backends: list[str]
    op: str = "read"
    geometry: Geometry = field(default_factory=lambda: models()["llama-3.1-8b"])
    blocks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    iters: int = 50
    warmup: int = 5
    inflight: int = 1
    order: str = "random"
    device: str = "cpu"
    seed: int = 0
    max_cache_bytes: int = 2 << 30  # per side

    @property
    def num_blocks(self) -> int:
        return max(self.blocks) * self.inflight


@dataclass
class Row:
    """One line of the report: one backend at one request size."""

    backend: str
    op: str
    blocks: int
    bytes_per_request: int
    requests: int
    avg_ms: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    gbps: float
    raw_gbps: float
    checked: bool
    transport: str = ""


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def _slots(config: BenchConfig, blocks: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(local, remote) block ids for each of the ``inflight`` slots."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    span = max(config.blocks)
    out = []
    for s in range(config.inflight):
        if config.order == "contiguous":
            local = remote = list(range(s * span, s * span + blocks))
        else:
            local = (torch.randperm(span, generator=gen)[:blocks] + s * span).tolist()
            remote = (torch.randperm(span, generator=gen)[:blocks] + s * span).tolist()
        out.append((local, remote))
    return out


def _timed(submit: Callable[[int], Any], count: int, inflight: int) -> tuple[list[float], float]:
    """Run ``count`` requests, ``inflight`` outstanding; (latencies in s, wall seconds)."""
    lat: list[float] = []
    running: deque = deque()
    t0 = time.perf_counter()
    for i in range(count):
        if len(running) >= inflight:
            running.popleft().wait()
        start = time.perf_counter()
        h = submit(i)
        h.add_done_callback(lambda _h, s=start: lat.append(time.perf_counter() - s))
        running.append(h)
    while running:
        running.popleft().wait()
    return lat, time.perf_counter() - t0


def _raw(sock: socket.socket, op: str, nbytes: int, iters: int, buf: bytearray) -> float:
    """GB/s of ``iters`` raw requests of ``nbytes`` over ``sock``, one at a time."""
    head = (b"w" if op == "write" else b"r") + nbytes.to_bytes(8, "big")
    view = memoryview(buf)[:nbytes]
    ack = bytearray(1)
    t0 = time.perf_counter()
    for _ in range(iters):
        if op == "write":
            sock.sendall(head)
            sock.sendall(view)
            _recv_exact(sock, memoryview(ack))
        else:
            sock.sendall(head)
            _recv_exact(sock, view)
    return nbytes * iters / (time.perf_counter() - t0) / 1e9


@dataclass
class _Local:
    proc: subprocess.Popen
    address: str


def spawn_local_server() -> _Local:
    """Start ``kvxfer bench serve --once`` on localhost; return it and its address."""
    proc = subprocess.Popen([sys.executable, "-m", "kvxfer.cli", "bench", "serve", "--listen",
                             "127.0.0.1:0", "--once"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout is not None
    while (line := proc.stdout.readline()):
        if line.startswith("listening "):
            return _Local(proc, line.split()[1])
    proc.wait(10)
    raise RuntimeError(f"the local bench server did not start (exit {proc.returncode})")


def run(config: BenchConfig, connect: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None) -> Iterator[Row]:
    """Measure every backend of ``config`` against a bench server; yields rows as they
    are measured. Without ``connect`` a local server process is spawned and stopped."""
    import kvxfer

    if config.op not in ("read", "write"):
        raise ValueError(f"op must be read or write, got {config.op!r}")
    need = config.num_blocks * config.geometry.block_bytes
    if need > config.max_cache_bytes:
        raise ValueError(f"a cache of {config.num_blocks} blocks x "
                         f"{config.geometry.block_bytes} bytes = {need / 2**30:.1f} GiB per "
                         f"side exceeds --max-cache-gib; use fewer --blocks or --inflight")
    local = spawn_local_server() if connect is None else None
    address = local.address if local else connect
    assert address is not None
    ctl = Control(socket.create_connection(_split(address), timeout=60))
    ctl.sock.settimeout(None)
    here = ctl.sock.getsockname()[0]
    raw_sock = socket.create_connection((_split(address)[0], ctl.call(op="baseline")["port"]))
    raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw_buf = bytearray(max(config.blocks) * config.geometry.block_bytes)
    raw_cache: dict[int, float] = {}
    geo = config.geometry
    try:
        for backend in config.backends:
            meta = ctl.call(op="setup", backend=backend, geometry=geo.__dict__,
                            num_blocks=config.num_blocks, device=config.device,
                            seed=config.seed + 1)["metadata"]
            layout = build_cache(geo, config.num_blocks, config.seed + 2, config.device)
            with kvxfer.Agent(f"bench-runner-{backend}", backend=backend,
                              listen=f"{here}:0") as agent:
                agent.register_kv_cache(layout)
                peer = agent.add_peer(bytes.fromhex(meta))
                ctl.call(op="peer", metadata=agent.metadata().hex())
                transport = getattr(peer, "transport", "")
                for blocks in config.blocks:
                    if progress:
                        progress(f"{backend} {blocks} blocks")
                    slots = _slots(config, blocks, config.seed + blocks)

                    def submit(i: int) -> Any:
                        lo, re_ = slots[i % len(slots)]
                        if config.op == "read":
                            return agent.read(peer, re_, lo)
                        return agent.write(peer, lo, re_)

                    _timed(submit, config.warmup, config.inflight)
                    lat, wall = _timed(submit, config.iters, config.inflight)
                    lo, re_ = slots[0]
                    checked = block_digest(layout, lo) == ctl.call(op="digest",
                                                                   blocks=re_)["digest"]
                    nbytes = blocks * geo.block_bytes
                    if blocks not in raw_cache:
                        raw_cache[blocks] = _raw(raw_sock, config.op, nbytes, config.iters,
                                                 raw_buf)
                    lat.sort()
                    ms = [x * 1e3 for x in lat]
                    yield Row(backend, config.op, blocks, nbytes, len(lat), sum(ms) / len(ms),
                              _percentile(ms, 0.5), _percentile(ms, 0.99),
                              _percentile(ms, 0.999), nbytes * len(lat) / wall / 1e9,
                              raw_cache[blocks], checked, transport)
            ctl.call(op="teardown")
    finally:
        raw_sock.close()
        ctl.close()
        if local is not None:
            try:
                local.proc.wait(30)
            except subprocess.TimeoutExpired:
                local.proc.kill()
                local.proc.wait(10)
