"""Agents that find each other through a real etcd, in real processes: add_peer by
name, kill -9 and TTL expiry, restart under the same name, an etcd outage and restart
in the middle of transfers, and two routers that find the same engines and build the
same prefix index from their events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import kvxfer  # noqa: E402
from kvpeer import block_bytes, build_layout  # noqa: E402
from kvxfer.discovery import Etcd  # noqa: E402
from kvxfer.metadata import metadata_incarnation  # noqa: E402
from kvxfer.errors import (DiscoveryUnavailable, PeerNotFound, PeerUnreachable,  # noqa: E402
                           TransferFailed)

from agent_proc import SPEC  # noqa: E402
from test_discovery_etcd import Events, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
TTL = 3


class Proc:
    """A child process speaking lines on stdin/stdout."""

    def __init__(self, script: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.first = self.p.stdout.readline().split()
        assert self.first and self.first[0] == "READY", self.first

    def ask(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def remote_agent(name: str, etcd, seed: int) -> Proc:
    return Proc("agent_proc.py", name, etcd.url, str(TTL), str(seed))


def check_read(agent: kvxfer.Agent, peer: kvxfer.Peer, seed: int, ids=(3, 9, 40)) -> None:
    local = [50, 51, 52]
    agent.read(peer, list(ids), local).wait(30)
    assert block_bytes(agent.layout, local) == block_bytes(build_layout(SPEC, seed), list(ids))


@pytest.fixture
def local(etcd):
    discovery = Etcd(etcd.url, ttl=TTL, timeout=1.0)
    agent = kvxfer.Agent("router-0", discovery=discovery)
    agent.register_kv_cache(build_layout(SPEC, 1))
    yield agent
    agent.close()
    discovery.close()


@pytest.mark.timeout(120)
def test_add_peer_by_name_kill_9_expiry_and_restart(etcd, local):
    events = Events()
    local.discovery.watch(events)
    remote = remote_agent("decode-3", etcd, seed=5)
    try:
        assert set(local.discovery.peers()) == {"router-0", "decode-3"}
        peer = local.add_peer("decode-3")
        assert peer.incarnation == remote.first[1] and peer.incarnation != local.incarnation
        check_read(local, peer, seed=5)
        assert local.add_peer("decode-3") is peer              # same incarnation: reused
        remote.kill9()
        killed = time.monotonic()
        with pytest.raises((TransferFailed, PeerUnreachable)):  # the old connection fails
            local.read(peer, [1], [2]).wait(10)
        assert wait_until(lambda: "decode-3" not in local.discovery.peers(), TTL + 3)
        gone_after = time.monotonic() - killed
        assert gone_after <= TTL + 1.5, gone_after
        assert wait_until(lambda: ("leave", "decode-3") in events.kinds(), 5)
        with pytest.raises(PeerNotFound, match="decode-3"):
            local.add_peer("decode-3")
        # Restarted under the same name: another incarnation, reached by the next add_peer.
        remote = remote_agent("decode-3", etcd, seed=6)
        again = local.add_peer("decode-3")
        assert again is not peer and again.incarnation == remote.first[1] != peer.incarnation
        check_read(local, again, seed=6)
        with pytest.raises(PeerUnreachable, match="added again"):
            local.read(peer, [1], [2])
        assert events.kinds().count(("join", "decode-3")) == 2
    finally:
        remote.close()
    assert wait_until(lambda: "decode-3" not in local.discovery.peers(), 5)  # clean exit


@pytest.mark.timeout(120)
def test_restart_before_the_old_lease_ends_replaces_the_entry(etcd, local):
    events = Events()
    local.discovery.watch(events)
    first = remote_agent("decode-3", etcd, seed=5)
    peer = local.add_peer("decode-3")
    first.kill9()
    second = remote_agent("decode-3", etcd, seed=7)       # well within the old TTL
    try:
        again = local.add_peer("decode-3")
        assert again.incarnation == second.first[1] != peer.incarnation
        check_read(local, again, seed=7)
        assert wait_until(lambda: [e for e in events.kinds() if e[1] == "decode-3"] ==
                          [("join", "decode-3"), ("leave", "decode-3"), ("join", "decode-3")], 5)
        time.sleep(TTL + 1)                                 # the old lease runs out...
        assert metadata_incarnation(local.discovery.lookup("decode-3")) == second.first[1]
        assert local.add_peer("decode-3") is again          # ...and takes nothing with it
    finally:
        second.close()


@pytest.mark.timeout(120)
def test_etcd_outage_and_restart_mid_run_leave_transfers_alone(etcd, local):
    remote = remote_agent("decode-3", etcd, seed=5)
    try:
        peer = local.add_peer("decode-3")
        failures: list[BaseException] = []
        done = threading.Event()
        reads = [0]

        def keep_reading() -> None:
            while not done.is_set():
                try:
                    check_read(local, peer, seed=5)
                    reads[0] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    return

        reader = threading.Thread(target=keep_reading)
        reader.start()
        try:
            assert wait_until(lambda: reads[0] >= 3, 20)
            etcd.kill()
            before = reads[0]
            with pytest.raises(DiscoveryUnavailable, match="etcd lookup failed"):
                local.add_peer("decode-3")
            with pytest.raises(DiscoveryUnavailable):
                local.discovery.peers()
            assert wait_until(lambda: reads[0] >= before + 5, 20)   # transfers go on
            time.sleep(TTL)                                         # past a lease's TTL
            etcd.start()
            assert wait_until(lambda: local._registration.published, 15)
            assert wait_until(lambda: set(local.discovery.peers()) ==
                              {"router-0", "decode-3"}, 15)
            assert local.add_peer("decode-3") is peer
            after = reads[0]
            assert wait_until(lambda: reads[0] >= after + 3, 20)
        finally:
            done.set()
            reader.join(30)
        assert failures == []
    finally:
        remote.close()


@pytest.mark.timeout(180)
def test_two_routers_build_the_same_index_from_the_same_engines(etcd):
    from kvxfer.prefix import KVEventSubscriber, PrefixIndex, SubscriberConfig
    from kvxfer.prefix.event_wire import medium_tier

    class RouterProc:
        """Finds engines in etcd; one subscriber per engine into one index."""

        def __init__(self) -> None:
            self.index = PrefixIndex()
            self.subs: dict[str, KVEventSubscriber] = {}
            self.discovery = Etcd(etcd.url, namespace="/kvxfer-events/")
            self.watch = self.discovery.watch(self.on_event)

        def on_event(self, event) -> None:
            if event.kind == "join":
                where = json.loads(event.metadata)
                self.subs[event.name] = KVEventSubscriber(
                    self.index, event.name, where["events"], where["replay"],
                    config=SubscriberConfig(poll_ms=10)).start()

        def close(self) -> None:
            self.discovery.close()
            for sub in self.subs.values():
                sub.close()

    engines = {f"engine-{i}": Proc("engine_proc.py", f"engine-{i}", etcd.url, str(10 + i))
               for i in range(2)}
    first = RouterProc()
    second = None
    try:
        assert wait_until(lambda: len(first.subs) == 2, 10)
        for e in engines.values():
            assert e.ask("publish 200") == "DONE"
        second = RouterProc()                                  # joins late
        assert wait_until(lambda: len(second.subs) == 2, 10)
        for e in engines.values():
            assert e.ask("publish 200") == "DONE"
        truth = {name: e.ask("truth") for name, e in engines.items()}

        def agrees(router) -> bool:
            for name, held in truth.items():
                want: dict[int, set] = {}
                for h, medium in json.loads(held):
                    want.setdefault(h, set()).add(medium_tier(medium))
                for h, tiers in want.items():
                    got = {loc.tier for loc in router.index.locations(h) if loc.worker == name}
                    if got != tiers:
                        return False
            return True

        assert wait_until(lambda: agrees(first) and agrees(second), 30)
        held = {h for t in truth.values() for h, _ in json.loads(t)}
        assert len(held) > 100 and len(first.index) == len(second.index) == len(held)
        assert [sorted(map(repr, first.index.locations(h))) for h in sorted(held)] == \
            [sorted(map(repr, second.index.locations(h))) for h in sorted(held)]
        assert second.subs["engine-0"].stats().joined_history > 0
    finally:
        for e in engines.values():
            e.close()
        first.close()
        if second is not None:
            second.close()
