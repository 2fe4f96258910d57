"""A peer process for integration tests: real agents in a separate process.

The test process starts :func:`peer_main` with ``multiprocessing`` (spawn) and talks to
it over a Pipe. The peer hosts one Agent per layout spec; each layout is filled with
bytes that depend only on (spec, seed), so the test can recompute what the peer holds.
A spec may be one tensor-parallel shard (``tp_rank`` of ``tp_size``, ``heads`` KV heads
in the model): its tensors are then that shard's heads of the single-process reference
(:func:`reference_tensors`), so every rank of one seed holds slices of one model's KV.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import dataclasses
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
    heads: int = HEADS  # KV heads of the model (all TP ranks together)
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def key(self) -> str:
        key = f"{self.ctor}-{self.dtype}-{self.num_blocks}-{self.layers}"
        if (self.heads, self.tp_size) != (HEADS, 1):
            key += f"-h{self.heads}-tp{self.tp_rank}of{self.tp_size}"
        return key

    def whole(self) -> "Spec":
        """The same model unsharded (TP 1): the single-process reference's spec."""
        return dataclasses.replace(self, tp_rank=0, tp_size=1)


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype) \
        .view(shape)


# Where the KV-head axis is in each ctor's tensors, and in its regions' block views.
HEAD_AXIS = {"nhd": 3, "hnd": 2, "flashinfer": 3, "split": 1}


def reference_tensors(spec: Spec, seed: int) -> list[torch.Tensor]:
    """The KV tensors of ``spec``'s model unsharded (every KV head), filled by ``seed``:
    per layer (``split``: every K, then every V)."""
    gen = torch.Generator().manual_seed(seed)
    dt, nb, L, H = DTYPES[spec.dtype], spec.num_blocks, spec.layers, spec.heads
    shapes = {"nhd": (2, nb, BLOCK_SIZE, H, HEAD_DIM), "hnd": (2, nb, H, BLOCK_SIZE, HEAD_DIM),
              "flashinfer": (nb, 2, BLOCK_SIZE, H, HEAD_DIM),
              "split": (nb * BLOCK_SIZE, H, HEAD_DIM), "mla": (nb, BLOCK_SIZE, 3 * HEAD_DIM)}
    if spec.ctor not in shapes:
        raise ValueError(spec.ctor)
    count = 2 * L if spec.ctor == "split" else L
    return [_random(shapes[spec.ctor], dt, gen) for _ in range(count)]


def shard_layout(spec: Spec, full: list[torch.Tensor]) -> kvxfer.KVLayout:
    """The layout of ``spec``'s shard of the unsharded tensors ``full`` (copied, unless
    the shard is all of them)."""
    if spec.ctor == "mla":
        return kvxfer.KVLayout.mla(full)
    from kvxfer.heads import shard_heads

    shard = shard_heads(spec.tp_rank, spec.tp_size, spec.heads)
    ts = [t.narrow(HEAD_AXIS[spec.ctor], shard.first, shard.count).contiguous() for t in full]
    tp = {"tp_rank": spec.tp_rank, "tp_size": spec.tp_size, "total_kv_heads": spec.heads}
    if spec.ctor == "split":
        return kvxfer.KVLayout.split_kv(ts[:spec.layers], ts[spec.layers:], BLOCK_SIZE, **tp)
    order = "HND" if spec.ctor == "hnd" else "NHD"
    return kvxfer.KVLayout.vllm(ts, kv_layout=order, kv_dim=int(spec.ctor == "flashinfer"),
                                **tp)


def build_layout(spec: Spec, seed: int) -> kvxfer.KVLayout:
    return shard_layout(spec, reference_tensors(spec, seed))


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
              prefix: str = "peer", netns: str | None = None) -> None:
    """Serve agents for ``specs`` until told to stop; answers commands on ``conn``.

    Agents are named ``{prefix}-{spec.key}`` (two peer processes need two prefixes).
    With ``netns``, the process first moves into that network namespace (see netns.py).
    """
    if netns is not None:
        import netns as _netns

        _netns.enter(netns)
    agents: dict[str, tuple[kvxfer.Agent, kvxfer.KVLayout]] = {}
    begun: dict[bytes, kvxfer.TransferHandle] = {}  # "begin" transfers, by key
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
            elif cmd == "begin":  # (spec, meta, op, local, remote, key): start, answer
                meta, op, local, remote, key = args[1:]
                peer = agent.add_peer(meta)  # connected by a warm read into our last block
                agent.read(peer, [0], [layout.num_blocks - 1]).wait(10)
                if op == "read":
                    begun[key] = agent.read(peer, remote, local)
                else:
                    begun[key] = agent.write(peer, local, remote, notify=key)
                conn.send("started")
            elif cmd == "outcome":  # (spec, key, timeout): how a begun transfer ended
                try:
                    begun.pop(args[1]).wait(args[2])
                    conn.send("ok")
                except kvxfer.KvxferError as exc:
                    conn.send(f"failed: {exc}")
            elif cmd == "read_from":  # the peer initiates: read blocks from the test's agent
                meta, remote, local = args[1:]
                try:
                    agent.read(agent.add_peer(meta), remote, local).wait(10)
                    conn.send("ok")
                except kvxfer.KvxferError as exc:
                    conn.send(f"failed: {exc}")
    finally:
        for agent, _ in agents.values():
            agent.close()


class PeerProcess:
    """A spawned process hosting one agent per spec; see kvpeer.peer_main."""

    def __init__(self, specs: list[Spec], seed: int = 1, prefix: str = "peer",
                 netns: str | None = None, start: str = "spawn", **options: Any) -> None:
        """``netns``: the network namespace the peer runs in (see netns.py); ``start``:
        the multiprocessing start method ("forkserver" with kvpeer preloaded starts a
        peer in a tenth of a second instead of seconds)."""
        ctx = mp.get_context(start)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=peer_main,
                                args=(child, specs, seed, options, prefix, netns), daemon=True)
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

    def send(self, *cmd: Any) -> None:
        """A command whose answer is read later (:meth:`answer`), or never."""
        self.conn.send(cmd)

    def answer(self, timeout: float = 30) -> Any:
        return self._recv(timeout)

    def kill(self) -> None:
        """SIGKILL: the peer dies at once, without closing anything, even mid-command."""
        if self.proc.is_alive():  # never signal a pid that may be another process now
            os.kill(self.proc.pid, signal.SIGKILL)
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
