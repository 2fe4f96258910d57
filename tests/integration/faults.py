"""The fault matrix: faults between two network namespaces, and what must hold after each.

Shared by tests/integration/test_fault_matrix.py (each case once per backend) and
benchmarks/fault_matrix.py (each case N times, a table).

Theory of operation
-------------------
::

    namespace A (the "remote node")           namespace B (the driver's node)
    victim peer process  <=== veth, tbf ===>  driver: this module's `drive`, which owns
    (kvpeer, setns into A)      |             the agent under test ("driver"), with
                                |             its KV cache, and checks every outcome
                          relay process       healthy peer process (kvpeer, in B)
                          (in B, dials A)

The driver runs in B (``ip netns exec B``); the peers it starts move themselves into
their namespace (kvpeer's ``netns``), so their Pipes still reach the driver. Each run
makes a fresh driver agent, starts a transfer across the link, injects one fault, and
checks, with every wait bounded:

- hang: a wait ran past the transfer's deadline plus SLACK (measured, not assumed);
- corrupt: a transfer that completed left bytes unlike the source's in its blocks;
- stray: a block outside the transfer's changed, or any block changed after the
  transfer had failed (bytes that were held in a stalled peer, a pulled link or the
  relay must never land late);
- healthy: afterwards the same agent reads byte-exact from a healthy peer.

Which backends a case applies to is in its ``backends``; the relay reaches only what
goes through one TCP connection (tcp; nccl's control connection, not its Gloo
payloads). UCX and NIXL open lanes of their own, which the relay cannot sit in.

    python faults.py drive LINK_JSON BACKEND CASES REPEAT   one JSON line per run
"""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import kvxfer  # noqa: E402
from kvxfer.backends import get_backend  # noqa: E402
import netns  # noqa: E402
from kvpeer import PeerProcess, Spec, block_bytes, build_layout  # noqa: E402
from relay import relay_main  # noqa: E402

DEADLINE = 1.5  # the driver agent's transfer_timeout (s)
SLACK = 2.0  # a wait longer than deadline + SLACK is a hang (nixl settles posted ops 1.5 s)
RATE = "50mbit"  # the link each way, tbf: 6 MB/s
BIG = Spec("nhd", "bfloat16", 4096, 3)  # 256 B blocks x 6 regions: 6 MiB
SMALL = Spec("nhd", "bfloat16", 64, 3)  # the healthy peer's
SRC = list(range(0, BIG.num_blocks, 2))  # 3 MiB: half a second on the link
# 256 KiB chunks, two in flight: a fault finds most of a transfer still to go
CHUNKS = {"chunk_bytes": 256 << 10, "max_inflight": 2}
DEST = list(range(1024, 1024 + len(SRC)))  # contiguous; 1023 and 3072 are canaries
VICTIM_SEED, RESTART_SEED, DRIVER_SEED, HEALTHY_SEED = 1, 3, 2, 4
RELAYED = ("tcp", "nccl")


class Hang(Exception):
    """A bounded wait ran out: the thing waited for never ended."""


@dataclass
class Run:
    """One case's outcome; ``result`` is "completed" or "failed" (of the transfer)."""

    case: str
    backend: str
    result: str = "failed"
    waited_s: float = 0.0  # the longest bounded wait for the transfer's outcome
    wall_s: float = 0.0  # the whole run, set-up and checks included
    hang: bool = False
    corrupt: bool = False
    stray: bool = False
    healthy: bool = False
    error: str = ""  # an exception of the driver itself (not a failed transfer)
    detail: dict = field(default_factory=dict)


class World:
    """The driver's side of the link: peers, their expected bytes, the fault knobs."""

    def __init__(self, link: netns.Link, backend: str) -> None:
        self.link, self.backend = link, backend
        self.ctx = mp.get_context("forkserver")
        # The codec's per-chunk checksums where a backend has a data path of ours (not
        # nixl's one-sided reads): what catches a payload altered past TCP's checksum.
        self.options: dict[str, Any] = ({} if get_backend(backend).one_sided
                                        else {"checksum": True})
        self.layout = build_layout(BIG, DRIVER_SEED)
        self.expect = {seed: block_bytes(build_layout(BIG, seed), SRC)
                       for seed in (VICTIM_SEED, RESTART_SEED)}
        self.healthy_bytes = block_bytes(build_layout(SMALL, HEALTHY_SEED), [1, 2, 3])
        self.healthy = self._peer([SMALL], HEALTHY_SEED, "healthy", link.b, link.addr_b)
        self._victim: PeerProcess | None = None

    def _peer(self, specs: list[Spec], seed: int, prefix: str, ns: str,
              addr: str) -> PeerProcess:
        return PeerProcess(specs, seed, prefix, netns=ns, start="forkserver",
                           backend=self.backend, listen=f"{addr}:0",
                           transfer_timeout=DEADLINE, **CHUNKS, **self.options)

    def victim(self, seed: int = VICTIM_SEED, fresh: bool = False) -> PeerProcess:
        """The peer in A (started again after a case killed it, or when ``fresh``)."""
        v = self._victim
        if fresh or v is None or not v.proc.is_alive():
            if v is not None:
                v.kill()  # as a crash does: nothing closed
            self._victim = v = self._peer([BIG], seed, "victim", self.link.a, self.link.addr_a)
        return v

    def agent(self) -> kvxfer.Agent:
        agent = kvxfer.Agent("driver", self.backend, f"{self.link.addr_b}:0",
                             transfer_timeout=DEADLINE, **CHUNKS, **self.options)
        agent.register_kv_cache(self.layout)
        return agent

    def relay(self, meta: bytes, down: dict, up: dict | None = None) -> tuple[Any, bytes]:
        """A relay in B to ``meta``'s agent; returns it and metadata that dials it."""
        raw = json.loads(meta[meta.index(b"{"):])
        host, port = raw["address"].rsplit(":", 1)
        backend_meta = base64.b64decode(raw["backend_metadata"])
        # nccl: its TCPStore, at the control connection's host, is relayed as it is
        verbatim = (json.loads(backend_meta)["store_port"],) if self.backend == "nccl" else ()
        conn, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=relay_main, daemon=True, args=(
            child, self.link.b, self.link.addr_b, (host, int(port)), down, up or {},
            verbatim))
        proc.start()
        if not conn.poll(30):
            raise Hang("the relay did not start")
        raw["address"] = f"{self.link.addr_b}:{conn.recv()}"
        body = json.dumps(raw, separators=(",", ":")).encode()
        return (proc, conn), meta[:meta.index(b"{")] + body

    def close(self) -> None:
        for p in (self._victim, self.healthy):
            if p is not None:
                p.stop()


def wait(h: kvxfer.TransferHandle, run: Run, bound: float = DEADLINE + SLACK) -> None:
    """Wait for ``h`` at most ``bound`` s; records the time, the result, a hang."""
    t0 = time.monotonic()
    try:
        h.wait(bound)
        run.result = "completed"
    except kvxfer.KvxferError as exc:
        run.detail["cause"] = f"{type(exc).__name__}: {exc}"[:200]
    run.waited_s = round(max(run.waited_s, time.monotonic() - t0), 3)
    if h.status == "pending":
        run.hang = True
        h.cancel()


def snapshot(layout: kvxfer.KVLayout) -> list[torch.Tensor]:
    """Every block of every region (copies, as bytes: random bfloat16 holds NaNs, which
    torch.equal would call unequal to themselves), for before/after comparisons."""
    return [r.view.clone().view(torch.uint8) for r in layout.regions]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def outside(before: list[torch.Tensor], after: list[torch.Tensor], named: list[int]) -> bool:
    """Did a block not in ``named`` change between the two snapshots?"""
    keep = torch.ones(BIG.num_blocks, dtype=torch.bool)
    keep[named] = False
    return not all(torch.equal(b[keep], a[keep]) for b, a in zip(before, after))


def settle_and_check(world: World, run: Run, at_end: list[torch.Tensor],
                     before: list[torch.Tensor], named: list[int]) -> None:
    """After the fault is gone: nothing outside ``named`` changed, and nothing at all
    changed since the transfer ended (late bytes)."""
    time.sleep(0.3)  # what a resumed peer, link or relay still held would land by now
    now = snapshot(world.layout)
    run.stray = run.stray or outside(before, now, named) or not same(now, at_end)


def healthy(world: World, agent: kvxfer.Agent, run: Run) -> None:
    peer = agent.add_peer(world.healthy.meta[SMALL.key])
    h = agent.read(peer, [1, 2, 3], [0, 1, 2])
    h.wait(DEADLINE + SLACK)
    run.healthy = block_bytes(world.layout, [0, 1, 2]) == world.healthy_bytes


def _read_with_fault(world: World, run: Run, fault: Callable[[], Any],
                     undo: Callable[[], Any] = lambda: None, meta: bytes | None = None,
                     timeout: float | None = None, mid: bool = True,
                     before_read: Callable[[], Any] = lambda: None) -> None:
    """The driver reads SRC of the victim into DEST; ``fault`` strikes once layer 0
    has landed (``mid``) or right after the read is posted; ``undo`` ends the fault
    after the outcome. A fault that already breaks the connection or its warm-up read
    (a flipped HELLO byte) fails the run's transfer: an allowed outcome."""
    victim = world.victim()
    with world.agent() as agent:
        before = snapshot(world.layout)
        try:
            try:
                peer = agent.add_peer(meta or victim.meta[BIG.key])
                agent.read(peer, [1], [DEST[0]]).wait(DEADLINE + SLACK)  # connected, warm
                before_read()
            except kvxfer.KvxferError as exc:
                run.detail["cause"] = f"before the read: {type(exc).__name__}: {exc}"[:200]
                at_end = snapshot(world.layout)
            else:
                h = agent.read(peer, SRC, DEST, timeout=timeout)
                if mid:
                    h.wait_layer(0, DEADLINE + SLACK)
                fault()
                wait(h, run, (timeout or DEADLINE) + SLACK)
                at_end = snapshot(world.layout)
                if run.result == "completed":
                    run.corrupt = block_bytes(world.layout, DEST) != world.expect[VICTIM_SEED]
        finally:
            undo()
        settle_and_check(world, run, at_end, before, DEST)
        healthy(world, agent, run)


def kill_peer_mid_read(world: World, run: Run) -> None:
    _read_with_fault(world, run, lambda: world.victim().kill())


def kill_peer_mid_write(world: World, run: Run) -> None:
    victim = world.victim()
    with world.agent() as agent:
        peer = agent.add_peer(victim.meta[BIG.key])
        agent.read(peer, [1], [0]).wait(DEADLINE + SLACK)
        before = snapshot(world.layout)
        h = agent.write(peer, DEST, SRC, notify=b"doomed")
        time.sleep(0.15)  # 3 MiB at 6 MB/s: a third of it is out
        victim.kill()
        wait(h, run)
        settle_and_check(world, run, snapshot(world.layout), before, [])
        healthy(world, agent, run)


def _initiator_killed(world: World, run: Run, op: str) -> None:
    """The victim reads from / writes into the driver's agent and dies mid-way."""
    victim = world.victim()
    with world.agent() as agent:
        before = snapshot(world.layout)
        key = f"{op}-{time.monotonic_ns()}".encode()
        victim.send("begin", BIG.key, agent.metadata(), op, SRC, DEST, key)
        if victim.answer(DEADLINE + SLACK) != "started":
            raise Hang("the victim did not start its transfer")
        t0 = time.monotonic()
        while op == "write" and same(snapshot(world.layout), before) \
                and time.monotonic() - t0 < DEADLINE:
            time.sleep(0.01)  # until the first bytes have landed: mid-write
        if op == "read":
            time.sleep(0.15)
        run.detail["landed_before_kill"] = not same(snapshot(world.layout), before)
        victim.kill()
        time.sleep(0.3)
        notes = [n for _, n in agent.notifications()]
        run.result = "completed" if key in notes else "failed"
        at_end = snapshot(world.layout)
        named = DEST if op == "write" else []
        if run.result == "completed":
            run.corrupt = block_bytes(world.layout, DEST) != world.expect[VICTIM_SEED]
        settle_and_check(world, run, at_end, before, named)
        healthy(world, agent, run)


def kill_initiator_mid_read(world: World, run: Run) -> None:
    _initiator_killed(world, run, "read")


def kill_initiator_mid_write(world: World, run: Run) -> None:
    _initiator_killed(world, run, "write")


def sigstop_peer(world: World, run: Run) -> None:
    victim = world.victim()
    _read_with_fault(world, run, victim.pause, victim.resume)


def link_down(world: World, run: Run) -> None:
    _read_with_fault(world, run, lambda: world.link.set_up(False),
                     lambda: world.link.set_up(True))


def _shaped(world: World, *qdisc: str) -> tuple[Callable[[], None], Callable[[], None]]:
    base = ("tbf", "rate", RATE, "burst", "256kb", "latency", "50ms")
    return lambda: world.link.shape_both(*qdisc), lambda: world.link.shape_both(*base)


def _drops(world: World) -> int:
    out = netns.sh("tc", "-s", "-n", world.link.a, "qdisc", "show", "dev", world.link.va)
    return sum(int(n) for n in re.findall(r"dropped (\d+)", out.stdout))


def lossy_link(world: World, run: Run) -> None:
    """A queue of 16 packets behind a 25 Mbit/s bucket: bursts overflow it, and TCP
    recovers from the tail drops (no red here: this kernel has no sch_red)."""
    shape, base = _shaped(world, "tbf", "rate", "25mbit", "burst", "8kb", "limit", "24kb")
    world.victim()
    shape()
    dropped = _drops(world)
    try:
        _read_with_fault(world, run, lambda: None, timeout=20.0, mid=False)
    finally:
        run.detail["dropped_packets"] = _drops(world) - dropped
        base()


def slow_link(world: World, run: Run) -> None:
    """5 Mbit/s: the 3 MiB read needs 5 s, past its deadline."""
    shape, base = _shaped(world, "tbf", "rate", "5mbit", "burst", "32kb", "latency", "50ms")
    world.victim()
    shape()
    try:
        _read_with_fault(world, run, lambda: None, mid=False)
    finally:
        base()


def _relayed(world: World, run: Run, down: dict | None = None, up: dict | None = None,
             timeout: float | None = None) -> None:
    """The read goes through a relay; ``down``/``up`` take effect once the connection is
    up and warm (their offsets count from there: the read's own bytes)."""
    relay, meta = world.relay(world.victim().meta[BIG.key], {}, {})
    proc, conn = relay

    def arm() -> None:
        for way, mode in (("down", down), ("up", up)):
            if mode:
                conn.send(("set", way, mode))
                conn.recv()

    try:
        _read_with_fault(world, run, lambda: None, meta=meta, timeout=timeout, mid=False,
                         before_read=arm)
        conn.send("stats")
        run.detail["relay"] = conn.recv() if conn.poll(5) else "no answer"
    finally:
        conn.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def relay_jitter(world: World, run: Run) -> None:
    jitter = {"kind": "jitter", "jitter_ms": 4}
    _relayed(world, run, jitter, jitter, timeout=20.0)


def relay_stall(world: World, run: Run) -> None:
    """Nothing moves for longer than the deadline, 1 MiB into the read's answer (nccl:
    its control connection, 64 bytes in); then the held bytes go on (they must not
    land)."""
    after = 64 if world.backend == "nccl" else 1 << 20
    _relayed(world, run, {"kind": "stall", "after": after, "seconds": DEADLINE + 1.0})


def relay_flip_hello(world: World, run: Run) -> None:
    """A byte of the peer's HELLO answer: add_peer must refuse (or the bytes be right)."""
    relay, meta = world.relay(world.victim().meta[BIG.key], {"kind": "flip", "at": 40})
    proc, conn = relay
    try:
        _read_with_fault(world, run, lambda: None, meta=meta, mid=False)
    finally:
        conn.send("stop")
        proc.join(10)


def relay_flip_header(world: World, run: Run) -> None:
    """A byte of the first frame header of the read's answer."""
    _relayed(world, run, {"kind": "flip", "at": 20})


def relay_flip_payload(world: World, run: Run) -> None:
    """A byte 1 MiB into the read's answer: KV payload. The relay's TCP recomputes
    TCP's checksum, as any middlebox or a bit flip in a NIC's memory would."""
    _relayed(world, run, {"kind": "flip", "at": (1 << 20) + 12345})


def relay_flip_request(world: World, run: Run) -> None:
    """A byte of the read request (the block ids it names)."""
    _relayed(world, run, up={"kind": "flip", "at": 30})


def restart_same_name(world: World, run: Run) -> None:
    """The victim dies and a new process starts under its name, with other bytes."""
    with world.agent() as agent:
        old = agent.add_peer(world.victim().meta[BIG.key])
        agent.read(old, [1], [DEST[0]]).wait(DEADLINE + SLACK)
        new_meta = world.victim(RESTART_SEED, fresh=True).meta[BIG.key]
        before = snapshot(world.layout)
        try:  # the old connection is dead: fails within its deadline, lands nothing
            wait(agent.read(old, SRC, DEST), run)
        except kvxfer.PeerUnreachable as exc:
            run.detail["old_before_readd"] = type(exc).__name__
        old_failed = run.result == "failed"
        new = agent.add_peer(new_meta)
        run.result = "failed"
        wait(agent.read(new, SRC, DEST), run)
        run.corrupt = run.result == "completed" and \
            block_bytes(world.layout, DEST) != world.expect[RESTART_SEED]
        try:
            agent.read(old, [1], [DEST[0]])
            run.detail["old_after_readd"] = "accepted"
            old_failed = False
        except kvxfer.PeerUnreachable:
            run.detail["old_after_readd"] = "PeerUnreachable"
        run.detail["peers"] = len(agent.peers)
        if not old_failed or len(agent.peers) != 1:
            run.result = "failed"  # an old handle worked, or a stale connection stayed
        settle_and_check(world, run, snapshot(world.layout), before, DEST)
        healthy(world, agent, run)
    world.victim(fresh=True)  # the next case's victim has the usual bytes


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[World, Run], None]
    backends: tuple[str, ...] = ("tcp", "ucx", "nixl", "nccl")
    # what a run must end as: "completed", "failed" or "either" (failing in time is fine)
    expect: str = "either"
    # a flipped payload byte is caught only by the codec's checksums (Agent(checksum=))
    needs_checksum: bool = False
    why_not: str = "needs the transfer in one TCP connection (a relay between the nodes)"

    def skip_reason(self, backend: str) -> str | None:
        if backend in self.backends:
            return None
        return f"{self.name} {self.why_not}; {backend} " + (
            "carries payloads over Gloo, beside the relayed control connection"
            if backend == "nccl" else "opens lanes of its own")


CASES = [
    Case("kill_peer_mid_read", kill_peer_mid_read),
    Case("kill_peer_mid_write", kill_peer_mid_write),
    Case("kill_initiator_mid_read", kill_initiator_mid_read),
    Case("kill_initiator_mid_write", kill_initiator_mid_write),
    Case("sigstop_peer", sigstop_peer, expect="failed"),
    Case("link_down", link_down, expect="failed"),
    Case("lossy_link", lossy_link),
    Case("slow_link", slow_link, expect="failed"),
    Case("restart_same_name", restart_same_name, expect="completed"),
    Case("relay_jitter", relay_jitter, RELAYED, expect="completed"),
    Case("relay_stall", relay_stall, RELAYED, expect="failed"),
    Case("relay_flip_hello", relay_flip_hello, RELAYED),
    Case("relay_flip_header", relay_flip_header, RELAYED),
    Case("relay_flip_payload", relay_flip_payload, ("tcp",), needs_checksum=True,
         why_not="needs the payload in the relayed connection"),
    Case("relay_flip_request", relay_flip_request, RELAYED),
]
BY_NAME = {c.name: c for c in CASES}


def drive(link: netns.Link, backend: str, names: list[str], repeat: int) -> None:
    """Run each case ``repeat`` times; one JSON line per run on stdout ("RUN {...}")."""
    mp.set_forkserver_preload(["kvpeer", "relay", "netns"])
    world = World(link, backend)
    try:
        for _ in range(repeat):
            for name in names:
                run = Run(name, backend)
                t0 = time.monotonic()
                try:
                    BY_NAME[name].run(world, run)
                except Exception as exc:  # noqa: BLE001 - the table counts it
                    run.error = f"{type(exc).__name__}: {exc}"[:300]
                run.wall_s = round(time.monotonic() - t0, 2)
                print("RUN " + json.dumps(run.__dict__), flush=True)
    finally:
        world.close()


def driver_command(link: netns.Link, backend: str, names: list[str], repeat: int) -> list[str]:
    """The command that runs :func:`drive` inside namespace B."""
    # UCX (ucx, nixl) would find shared memory between the namespaces and bypass the
    # veth; restricted to TCP it takes the path it has between machines without RDMA.
    return ["ip", "netns", "exec", link.b, "env", "UCX_TLS=tcp", sys.executable,
            os.path.abspath(__file__), "drive", json.dumps(link.__dict__), backend,
            ",".join(names), str(repeat)]


def parse_runs(stdout: str) -> list[dict]:
    return [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("RUN ")]


def verdict(case: Case, run: dict) -> list[str]:
    """What is wrong with one run (empty: nothing)."""
    wrong = [k for k in ("hang", "corrupt", "stray") if run[k]]
    if not run["healthy"]:
        wrong.append("healthy peer not served")
    if run["error"]:
        wrong.append(f"driver error {run['error']}")
    if case.expect != "either" and run["result"] != case.expect and not run["error"]:
        wrong.append(f"{run['result']}, expected {case.expect}")
    return wrong


if __name__ == "__main__":
    if sys.argv[1] == "drive":
        drive(netns.Link(**json.loads(sys.argv[2])), sys.argv[3], sys.argv[4].split(","),
              int(sys.argv[5]))
