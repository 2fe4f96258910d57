"""A peer process for integration tests: real agents in a separate process.

The test process starts :func:`peer_main` with ``multiprocessing`` (spawn) and talks to
it over a Pipe. The peer hosts one Agent per layout spec; each layout is filled with
bytes that depend only on (spec, seed), so the test can recompute what the peer holds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

import kvxfer

LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 16
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "uint8": torch.uint8}  # uint8 stands for fp8 as engines hold it


@dataclass(frozen=True)
class Spec:
    ctor: str  # "nhd", "hnd", "flashinfer", "split", "mla"
    dtype: str
    num_blocks: int = 32
    layers: int = LAYERS

    @property
    def key(self) -> str:
        return f"{self.ctor}-{self.dtype}-{self.num_blocks}-{self.layers}"


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype) \
        .view(shape)


def build_layout(spec: Spec, seed: int) -> kvxfer.KVLayout:
    gen = torch.Generator().manual_seed(seed)
    dt, nb, L = DTYPES[spec.dtype], spec.num_blocks, spec.layers
    if spec.ctor == "nhd":
        return kvxfer.KVLayout.vllm([_random((2, nb, BLOCK_SIZE, HEADS, HEAD_DIM), dt, gen)
                                     for _ in range(L)], kv_layout="NHD")
    if spec.ctor == "hnd":
        return kvxfer.KVLayout.vllm([_random((2, nb, HEADS, BLOCK_SIZE, HEAD_DIM), dt, gen)
                                     for _ in range(L)], kv_layout="HND")
    if spec.ctor == "flashinfer":
        return kvxfer.KVLayout.vllm([_random((nb, 2, BLOCK_SIZE, HEADS, HEAD_DIM), dt, gen)
                                     for _ in range(L)], kv_layout="NHD", kv_dim=1)
    if spec.ctor == "split":
        ks = [_random((nb * BLOCK_SIZE, HEADS, HEAD_DIM), dt, gen) for _ in range(L)]
        vs = [_random((nb * BLOCK_SIZE, HEADS, HEAD_DIM), dt, gen) for _ in range(L)]
        return kvxfer.KVLayout.split_kv(ks, vs, BLOCK_SIZE)
    if spec.ctor == "mla":
        return kvxfer.KVLayout.mla([_random((nb, BLOCK_SIZE, 3 * HEAD_DIM), dt, gen)
                                    for _ in range(L)])
    raise ValueError(spec.ctor)


def block_bytes(layout: kvxfer.KVLayout, ids: list[int]) -> list[bytes]:
    """Per region, the bytes of blocks ``ids`` in that order."""
    return [r.view[ids].contiguous().view(torch.uint8).numpy().tobytes()
            for r in layout.regions]


def layer_block_bytes(layout: kvxfer.KVLayout, layer: int, ids: list[int]) -> list[bytes]:
    """Like :func:`block_bytes`, for the regions of one layer."""
    return [r.view[ids].contiguous().view(torch.uint8).numpy().tobytes()
            for r in layout.regions if r.layer == layer]


BACKENDS = ["tcp", "ucx", "nixl", "nccl"]


def usable_backend(name: str) -> str:
    """``name`` if its library imports here; otherwise the calling test is skipped."""
    import pytest

    from kvxfer.backends import get_backend

    try:
        get_backend(name)
    except kvxfer.BackendUnavailable as exc:
        pytest.skip(str(exc))
    return name


def local_agent(spec: Spec, seed: int = 2, name: str = "local",
                **options: Any) -> tuple[kvxfer.Agent, kvxfer.KVLayout]:
    """An Agent in this process with a registered layout for ``spec`` (filled by ``seed``)."""
    layout = build_layout(spec, seed)
    agent = kvxfer.Agent(name, **options)
    agent.register_kv_cache(layout)
    return agent, layout


def random_ids(n: int, count: int, gen: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=gen)[:count].tolist()


def snapshot(layout: kvxfer.KVLayout) -> list[bytes]:
    """Every block of every region, for before/after comparisons."""
    return block_bytes(layout, list(range(layout.num_blocks)))


def peer_main(conn: Any, specs: list[Spec], seed: int, options: dict,
              prefix: str = "peer") -> None:
    """Serve agents for ``specs`` until told to stop; answers commands on ``conn``.

    Agents are named ``{prefix}-{spec.key}`` (two peer processes need two prefixes).
    """
    agents: dict[str, tuple[kvxfer.Agent, kvxfer.KVLayout]] = {}
    try:
        for spec in specs:
            layout = build_layout(spec, seed)
            agent = kvxfer.Agent(f"{prefix}-{spec.key}", **options)
            agent.register_kv_cache(layout)
            agents[spec.key] = (agent, layout)
        conn.send({key: agent.metadata() for key, (agent, _) in agents.items()})
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            if cmd == "kill":  # die without closing anything, as a crashed process does
                os.kill(os.getpid(), signal.SIGKILL)
            agent, layout = agents[args[0]]
            if cmd == "restart":  # a new incarnation under the same name, same blocks
                agent.close()
                agent = kvxfer.Agent(agent.name, **options)
                agent.register_kv_cache(layout)
                agents[args[0]] = (agent, layout)
                conn.send(agent.metadata())
            elif cmd == "blocks":
                conn.send(block_bytes(layout, list(args[1])))
            elif cmd == "notes":
                conn.send(agent.notifications())
            elif cmd == "layer_blocks":  # (spec, layer, ids): that layer's bytes only
                conn.send(layer_block_bytes(layout, args[1], list(args[2])))
            elif cmd == "incoming":  # (spec, peer name, key, timeout): wait for it
                name, key, timeout = args[1:]
                inc = agent.incoming(key, name)
                try:
                    inc.wait(timeout)
                    conn.send(("done", sorted(inc.layers_landed)))
                except kvxfer.KvxferError as exc:
                    conn.send((f"failed: {exc}", sorted(inc.layers_landed)))
            elif cmd == "stream_to":  # (spec, meta, local, remote, key, order, gap s)
                meta, local, remote, key, order, gap = args[1:]
                s = agent.write_stream(agent.add_peer(meta), local, remote, key)
                for layer in order:
                    time.sleep(gap)
                    s.layer_ready(layer)
                s.finish(b"streamed " + key)
                try:
                    s.handle.wait(30)
                    conn.send("ok")
                except kvxfer.KvxferError as exc:
                    conn.send(f"failed: {exc}")
            elif cmd == "read_from":  # the peer initiates: read blocks from the test's agent
                meta, remote, local = args[1:]
                peer = agent.add_peer(meta)
                try:
                    agent.read(peer, remote, local).wait(10)
                    conn.send("ok")
                except kvxfer.KvxferError as exc:
                    conn.send(f"failed: {exc}")
    finally:
        for agent, _ in agents.values():
            agent.close()


class PeerProcess:
    """A spawned process hosting one agent per spec; see kvpeer.peer_main."""

    def __init__(self, specs: list[Spec], seed: int = 1, prefix: str = "peer",
                 **options: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=peer_main, args=(child, specs, seed, options, prefix),
                                daemon=True)
        self.proc.start()
        child.close()
        self.meta: dict[str, bytes] = self._recv(60)

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("peer process did not answer")
        return self.conn.recv()

    def call(self, *cmd: Any, timeout: float = 30) -> Any:
        self.conn.send(cmd)
        return self._recv(timeout)

    def kill(self) -> None:
        self.conn.send(("kill",))
        self.proc.join(10)

    def thread_states(self) -> list[str]:
        """The scheduler state of each of the peer's threads ("S", "R", "T", ...), from
        /proc (Linux); a thread that ends while they are read is left out."""
        states = []
        base = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/stat") as f:
                    stat = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            states.append(stat.rsplit(")", 1)[1].split()[0])  # the field after "(comm)"
        return states

    def pause(self, timeout: float = 10) -> None:
        """Stop the peer (SIGSTOP); returns once every thread of it has stopped.

        ``kill`` returns before the target stops: the kernel wakes one thread, which
        starts the group stop only once it is scheduled, and until then the peer's
        serving thread goes on answering. On a loaded 2-core machine a "stopped" peer
        served a whole 3 MiB read 0.35 s after ``kill`` returned.

        Raises:
            TimeoutError: some thread still runs after ``timeout`` seconds.
        """
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not all(state in "tTXZ" for state in self.thread_states()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer process {self.proc.pid} did not stop: "
                                   f"{self.thread_states()}")
            time.sleep(0.001)

    def resume(self) -> None:
        """Let a paused peer run again (SIGCONT)."""
        os.kill(self.proc.pid, signal.SIGCONT)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The peer stopped (see :meth:`pause`) for the block, resumed after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
