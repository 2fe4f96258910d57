"""kvxfer.discovery.Etcd against a real etcd: registration, lookup, listing, watch,
lease expiry, etcd outages and restarts, bad arguments."""

from __future__ import annotations

import threading
import time

import pytest

from kvxfer.discovery import Etcd, PeerEvent
from kvxfer.errors import AgentClosed, DiscoveryUnavailable, PeerNotFound


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[PeerEvent] = []

    def __call__(self, event: PeerEvent) -> None:
        with self.lock:
            self.seen.append(event)

    def kinds(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(e.kind, e.name) for e in self.seen]


def test_register_lookup_list_and_withdraw(etcd):
    with Etcd(etcd.url, namespace="/t1/") as d, Etcd([etcd.url], namespace="/t2/") as other:
        reg = d.register("prefill-0", b"meta-0")
        assert reg.published and reg.error is None
        d.register("decode-1", lambda: b"meta-1")
        assert d.lookup("prefill-0") == b"meta-0"
        assert d.peers() == {"prefill-0": b"meta-0", "decode-1": b"meta-1"}
        assert other.peers() == {}                       # namespaces are apart
        with pytest.raises(PeerNotFound, match="decode-9"):
            d.lookup("decode-9")
        reg.close()
        reg.close()
        assert not reg.published
        with pytest.raises(PeerNotFound):              # revoked: gone at once
            d.lookup("prefill-0")
    with pytest.raises(AgentClosed):
        d.lookup("decode-1")


def test_an_entry_whose_lease_is_not_kept_alive_expires_within_its_ttl(etcd):
    with Etcd(etcd.url, ttl=2) as d:
        reg = d.register("w", b"m")
        reg._stop.set()                                  # as if the process froze
        reg._thread.join()
        t0 = time.monotonic()
        assert wait_until(lambda: "w" not in d.peers(), timeout=6)
        assert time.monotonic() - t0 <= 2 + 1.5


def test_a_kept_alive_entry_outlives_its_ttl(etcd):
    with Etcd(etcd.url, ttl=2) as d:
        d.register("w", b"m")
        time.sleep(5)
        assert d.lookup("w") == b"m"


def test_watch_reports_joins_leaves_and_replacements(etcd):
    with Etcd(etcd.url) as d:
        d.register("old", b"o")
        events = Events()
        watch = d.watch(events)
        assert watch.wait_synced(10)
        assert wait_until(lambda: events.kinds() == [("join", "old")])
        a = d.register("a", b"a1")
        assert wait_until(lambda: events.kinds()[-1:] == [("join", "a")])
        d.register("a", b"a2")                           # a restart under the same name
        assert wait_until(lambda: events.kinds()[-2:] == [("leave", "a"), ("join", "a")])
        assert [e.metadata for e in events.seen[-2:]] == [b"a1", b"a2"]
        a.close()
        watch.close()
        watch.close()
        assert not watch._thread.is_alive()


def test_an_etcd_outage_fails_clearly_and_everything_recovers(etcd):
    with Etcd(etcd.url, ttl=3, timeout=1.0) as d:
        reg = d.register("a", b"a")
        events = Events()
        watch = d.watch(events)
        assert wait_until(lambda: events.kinds() == [("join", "a")])
        etcd.kill()
        with pytest.raises(DiscoveryUnavailable, match="no endpoint answered.*127.0.0.1"):
            d.lookup("a")
        with pytest.raises(DiscoveryUnavailable):
            d.peers()
        late = d.register("b", b"b")                    # publishing fails, is retried
        assert late.error is not None and not late.published
        with pytest.raises(DiscoveryUnavailable, match="not published"):
            late.wait_published(0.1)
        assert wait_until(lambda: not reg.published and watch.error is not None, 5)
        etcd.start()
        late.wait_published(10)
        assert wait_until(lambda: reg.published, 10)
        assert d.peers() == {"a": b"a", "b": b"b"}
        assert wait_until(lambda: events.kinds() == [("join", "a"), ("join", "b")], 10)
        assert watch.error is None


def test_a_new_etcd_gets_every_entry_again(etcd):
    with Etcd(etcd.url, ttl=2, timeout=1.0) as d:
        reg = d.register("a", b"a")
        etcd.wipe()                                      # all data and leases lost
        etcd.start()
        assert wait_until(lambda: reg.published and d.peers() == {"a": b"a"}, 15)


def test_two_endpoints_fail_over(etcd):
    dead = "http://127.0.0.1:9"                          # discard port: refused
    with Etcd([dead, etcd.url]) as d:
        d.register("a", b"a")
        assert d.lookup("a") == b"a"
    with Etcd(dead, timeout=0.5) as d:
        with pytest.raises(DiscoveryUnavailable, match="127.0.0.1:9"):
            d.peers()


def test_bad_arguments():
    with pytest.raises(ValueError, match="endpoint"):
        Etcd("ftp://x")
    with pytest.raises(ValueError, match="namespace"):
        Etcd("http://127.0.0.1:2379", namespace="/no-slash")
    with pytest.raises(ValueError, match="ttl"):
        Etcd("http://127.0.0.1:2379", ttl=1)
    with pytest.raises(ValueError, match="at least one"):
        Etcd([])
