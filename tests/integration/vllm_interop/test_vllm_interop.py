"""kvxfer against vLLM's own code, from its PyPI wheels (``make test-vllm-interop``).

The wheels (``vllm-<version>-*.whl``) are looked for in ``$KVXFER_VLLM_WHEELS``; the
make target downloads them there once (``pip download --no-deps``). Each test runs
vLLM's ``kv_cache_utils`` / ``kv_events`` in a process of its own (see
``vllm_wheel.py`` for the few stubs) and checks kvxfer against what it produces:

- block hashes of random prompts with LoRA (name and path), cache salt and multimodal
  items, whole and as the request grows, with and without PYTHONHASHSEED;
- a live ``ZmqEventPublisher`` -> ``KVEventSubscriber`` stream into a PrefixIndex,
  where a router stalled behind a flood loses batches at ZMQ's high-water mark and gets
  them back from vLLM's real replay ROUTER, and a second router that joins late
  rebuilds the same index from the replay buffer.
"""

from __future__ import annotations

import glob
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvxfer.prefix import BlockHasher, KVEventSubscriber, PrefixIndex, SubscriberConfig
from kvxfer.prefix.event_wire import medium_tier
from kvxfer.prefix.hashing import event_hash, key_scheme_for

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
WHEELS = sorted(glob.glob(os.path.join(os.environ.get("KVXFER_VLLM_WHEELS", "/nonexistent"),
                                       "vllm-*.whl")))
if not WHEELS:
    pytest.skip("no vLLM wheels in $KVXFER_VLLM_WHEELS (`make test-vllm-interop` downloads "
                "them)", allow_module_level=True)

sys.path.insert(0, HERE)
from vllm_wheel import wheel_version  # noqa: E402

IDS = [wheel_version(w) for w in WHEELS]


def side(args: list[str], tmp_path, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "vllm_side.py"), args[0],
                             args[1], str(tmp_path / "vllm"), *args[2:]], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw)


def random_cases(seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(60):
        block_size = rng.choice([1, 4, 16, 32])
        n = rng.randint(0, 7 * block_size + 3)
        tokens = [rng.randrange(rng.choice([24, 256, 1 << 17, 1 << 32])) for _ in range(n)]
        case: dict = {"block_size": block_size, "tokens": tokens}
        if rng.random() < 0.5:
            case["lora"] = [rng.choice(["sql", "lörä/ü", "a"]), f"/adapters/{i}"]
        if rng.random() < 0.5:
            case["salt"] = rng.choice(["s", "tenant-" + str(i), "X"])
        if rng.random() < 0.5 and n > 2:
            at, items = 0, []
            while at < n - 1 and len(items) < 4:
                off = rng.randint(at, n - 1)
                length = rng.randint(1, max(1, min(3 * block_size, n - off)))
                items.append([f"mm-{rng.randrange(4)}", off, length])
                at = off + length
            case["mm"] = items
        cases.append(case)
    cases[0].update(lora=["sql", "/a"], salt="s", mm=[["img", 1, 2]], tokens=list(range(64)),
                    block_size=16)
    return cases


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed_env", [None, "42"], ids=["default-seed", "PYTHONHASHSEED=42"])
@pytest.mark.parametrize("wheel", WHEELS, ids=IDS)
def test_block_hashes_equal_vllms_own(wheel, seed_env, tmp_path):
    cases = random_cases(7)
    env = {} if seed_env is None else {"PYTHONHASHSEED": seed_env}
    env_full = dict(os.environ)
    env_full.pop("PYTHONHASHSEED", None)
    env_full.update(env)
    proc = side(["hashes", wheel], tmp_path, env=env_full)
    out, _ = proc.communicate(json.dumps(cases), timeout=240)
    assert proc.returncode == 0
    got = json.loads(out)
    version = got["version"]
    hasher = BlockHasher.for_vllm(1, version, seed=seed_env)
    assert hasher.root.hex() == got["none_hash"]
    assert key_scheme_for(version) == ("untagged" if version.startswith("0.30") else "tagged")
    extras = 0
    for case, whole, grown in zip(cases, got["whole"], got["grown"]):
        h = BlockHasher.for_vllm(case["block_size"], version, seed=seed_env)
        lora = case.get("lora") or [None, None]
        ours = h.hash_blocks(case["tokens"], lora_name=lora[0], lora_path=lora[1],
                             cache_salt=case.get("salt"),
                             mm_keys=[tuple(m) for m in case.get("mm", ())])
        assert [d.hex() for d in ours] == whole == grown, case
        extras += bool(lora[0] or case.get("salt") or case.get("mm"))
    assert extras > 30  # most cases carry extra keys of some kind
    first = BlockHasher.for_vllm(16, version, seed=seed_env).hash_blocks(
        cases[0]["tokens"], lora_name="sql", lora_path="/a", cache_salt="s",
        mm_keys=[("img", 1, 2)])
    assert [event_hash(d) for d in first] == got["event_form"]


class Router:
    """One router: a PrefixIndex fed by a KVEventSubscriber; can be stalled."""

    def __init__(self, endpoint: str, replay: str) -> None:
        self.gate = threading.Event()
        self.gate.set()
        gate = self.gate

        class StallableIndex(PrefixIndex):
            def store_arrays(self, *args, **kwargs):  # the router's own work, held up
                gate.wait(60)
                return super().store_arrays(*args, **kwargs)

        self.index = StallableIndex()
        self.sub = KVEventSubscriber(self.index, "engine-0", endpoint, replay,
                                     topic="kv@engine", config=SubscriberConfig(
                                         poll_ms=10, replay_timeout_s=20.0, rcvhwm=16))

    def state(self, truth: list) -> dict:
        tiers: dict = {}
        for group, h, medium in truth:
            tiers.setdefault((group, h), set()).add(medium_tier(medium))
        seen = {key: {loc.tier for loc in self.index.locations(key[1], group=key[0])}
                for key in tiers}
        return {"missing_or_wrong": sum(seen[k] != tiers[k] for k in tiers),
                "entries": len(self.index), "want_entries": len(tiers)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("wheel", WHEELS, ids=IDS)
def test_live_vllm_publisher_with_drops_recovered_by_vllms_replay(wheel, tmp_path):
    port = free_port()
    replay = f"tcp://127.0.0.1:{free_port()}"
    endpoint = f"tcp://127.0.0.1:{port}"
    # vLLM binds a wildcard PUB endpoint (and connects to any other); its ROUTER binds.
    proc = side(["publish", wheel, f"tcp://*:{port}", replay, "5"], tmp_path)

    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    def settle(router: Router, timeout: float) -> None:
        """Ping until the router has applied every batch published so far. A batch lost
        at the tail of a burst is only noticed (and replayed) once a later one arrives,
        as in any vLLM stream; an engine in service keeps publishing."""
        deadline = time.monotonic() + timeout
        while True:
            n = int(ask("ping").split()[1])
            if router.sub.wait_applied(n - 1, 1.0):
                return
            assert time.monotonic() < deadline, router.sub.stats()

    try:
        assert proc.stdout.readline().strip() == "READY"
        first = Router(endpoint, replay)
        with first.sub:
            for _ in range(500):  # ZMQ's slow joiner: ping until the router hears one
                ask("ping")
                time.sleep(0.01)
                if first.sub.stats().batches:
                    break
            assert first.sub.stats().batches
            assert ask("flood 300").startswith("DONE")       # a healthy stream first
            ask("clear")
            assert ask("flood 100").startswith("DONE")
            settle(first, 60)
            truth = json.loads(ask("truth").split(" ", 1)[1])
            assert first.state(truth)["missing_or_wrong"] == 0
            # Stall the router; the engine floods on: ZMQ drops at its high-water mark.
            first.gate.clear()
            ask("ping")
            assert ask("flood 4000").startswith("DONE")
            first.gate.set()
            settle(first, 120)
            stats = first.sub.stats()
            assert stats.gaps >= 1 and stats.replayed >= 100, stats
            assert stats.unrecovered_gaps == 0 and stats.malformed == 0, stats
            assert stats.restarts == 0
            truth = json.loads(ask("truth").split(" ", 1)[1])
            assert len(truth) > 1000
            state = first.state(truth)
            assert state["missing_or_wrong"] == 0 and state["entries"] == \
                state["want_entries"], state
            # A second router joining now rebuilds the same index from vLLM's buffer.
            second = Router(endpoint, replay)
            with second.sub:
                for _ in range(500):
                    ask("ping")
                    time.sleep(0.01)
                    if second.sub.stats().batches:
                        break
                settle(second, 120)
                settle(first, 60)
                assert second.sub.stats().joined_history > 4000
                assert second.state(truth) == first.state(truth)
                for group in (0, 1):
                    keys = sorted({h for g, h, _ in truth if g == group})
                    assert [second.index.locations(h, group) for h in keys] == \
                        [first.index.locations(h, group) for h in keys]
        ask("quit")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
