"""The vLLM side of the interop tests, run as its own process on vLLM's own code.

    python vllm_side.py hashes WHEEL DEST < cases.json > hashes.json
    python vllm_side.py publish WHEEL DEST ENDPOINT REPLAY_ENDPOINT SEED

``hashes``: for each case (tokens, block size, LoRA, salt, multimodal items) the block
hashes vLLM's ``get_request_block_hasher`` + ``hash_block_tokens`` give, once for the
whole prompt and once as a request whose prompt ends after its last multimodal item
grows a few (generated) tokens at a time.

``publish``: a live ``ZmqEventPublisher`` (vLLM's class, its PUB and replay ROUTER)
driven by lines on stdin; it publishes ``KVEventBatch``es of vLLM's own
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` for random requests hashed by
vLLM, in KV-cache groups 0 and 1 and media GPU / CPU / STORAGE, and keeps the truth:
which (group, hash) the engine holds on which medium.

    ping           -> publish an empty batch;            "OK <batches so far>"
    clear          -> publish AllBlocksCleared + a store;   "OK <batches so far>"
    flood N        -> publish N workload batches, drain;  "DONE <batches so far>"
    truth          -> "TRUTH <json [[group, hash, medium], ...]>"
    quit           -> shut the publisher down
"""

from __future__ import annotations

import json
import random
import sys
import time
from types import SimpleNamespace

import vllm_wheel


def request(tokens, lora=None, salt=None, mm=()):
    return SimpleNamespace(
        block_hashes=[], num_tokens=len(tokens), all_token_ids=list(tokens),
        _all_token_ids=list(tokens),  # 0.34 reads its token buffer directly
        mm_features=[SimpleNamespace(identifier=i, mm_position=SimpleNamespace(offset=o,
                                                                               length=n))
                     for i, o, n in mm],
        lora_request=None if lora is None else SimpleNamespace(lora_name=lora[0],
                                                               lora_path=lora[1]),
        cache_salt=salt, prompt_embeds=None, _prompt_embeds_per_block_hashes={})


def vllm_hashes(v, case: dict, grow: bool) -> list[str]:
    kcu = v.kv_cache_utils
    hasher = kcu.get_request_block_hasher(case["block_size"], v.hashing.sha256_cbor)
    tokens = case["tokens"]
    req = request(tokens, case.get("lora"), case.get("salt"), case.get("mm", ()))
    if not grow:
        req.block_hashes = hasher(req)
    else:
        # As in vLLM: the prompt (every multimodal item in it) is hashed when the request
        # arrives, then each block that generated tokens complete.
        rng = random.Random(len(tokens))
        req.num_tokens = max([o + n for _, o, n in case.get("mm", ())], default=0)
        req.all_token_ids = req._all_token_ids = tokens[:req.num_tokens]
        req.block_hashes.extend(hasher(req))
        while req.num_tokens < len(tokens):
            req.num_tokens = min(len(tokens), req.num_tokens + rng.randint(1, 11))
            req.all_token_ids = req._all_token_ids = tokens[:req.num_tokens]
            req.block_hashes.extend(hasher(req))
    return [bytes(h).hex() for h in req.block_hashes]


def cmd_hashes(v) -> None:
    v.kv_cache_utils.init_none_hash(v.hashing.sha256_cbor)
    cases = json.load(sys.stdin)
    out = {"version": v.version, "none_hash": bytes(v.kv_cache_utils.NONE_HASH).hex(),
           "whole": [vllm_hashes(v, c, False) for c in cases],
           "grown": [vllm_hashes(v, c, True) for c in cases],
           "event_form": [v.kv_cache_utils.maybe_convert_block_hash(
               bytes.fromhex(h)) for h in vllm_hashes(v, cases[0], False)]}
    json.dump(out, sys.stdout)


class Engine:
    """Random requests, hashed by vLLM, stored and evicted as vLLM's events say."""

    MEDIA = ("GPU", "CPU", "STORAGE")

    def __init__(self, v, seed: int) -> None:
        self.v, self.ev = v, v.kv_events
        self.rng = random.Random(seed)
        self.held: set[tuple[int, int, str]] = set()   # (group, event hash, medium)
        self.chunks: list[tuple[int, str, list[int]]] = []  # stores, for removals to pick
        self.kcu = v.kv_cache_utils
        self.kcu.init_none_hash(v.hashing.sha256_cbor)

    def batch(self) -> list:
        rng, ev = self.rng, self.ev
        events = []
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.7 or not self.chunks:
                events.append(self.stored())
            else:  # evict a few blocks of one earlier store (some may be gone already)
                group, medium, hashes = self.chunks[rng.randrange(len(self.chunks))]
                gone = rng.sample(hashes, min(len(hashes), rng.randint(1, 8)))
                self.held.difference_update((group, h, medium) for h in gone)
                events.append(ev.BlockRemoved(block_hashes=gone, medium=medium,
                                              group_idx=group))
        return events

    def stored(self):
        rng = self.rng
        block_size = 16
        tokens = [rng.randrange(1 << 17) for _ in range(block_size * rng.randint(1, 24))]
        lora = rng.choice([None, ("sql-lora", "/adapters/sql/v2")])
        salt = rng.choice([None, "tenant-" + str(rng.randrange(3))])
        mm = [("img-" + str(rng.randrange(5)), 3, 40)] if rng.random() < 0.3 else []
        req = request(tokens, lora, salt, mm)
        hasher = self.kcu.get_request_block_hasher(block_size, self.v.hashing.sha256_cbor)
        hashes = [self.kcu.maybe_convert_block_hash(h) for h in hasher(req)]
        group = rng.choice([0, 0, 1])
        medium = rng.choice(self.MEDIA)
        self.held.update((group, h, medium) for h in hashes)
        self.chunks.append((group, medium, hashes))
        fields = dict(block_hashes=hashes, parent_block_hash=None, token_ids=tokens,
                      block_size=block_size, lora_id=None, medium=medium,
                      lora_name=None if lora is None else lora[0], group_idx=group)
        return self.ev.BlockStored(**fields)


def cmd_publish(v, endpoint: str, replay: str, seed: int) -> None:
    ev = v.kv_events
    pub = ev.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint,
                               replay_endpoint=replay, buffer_steps=100_000, hwm=16,
                               topic="kv@engine-0")
    engine = Engine(v, seed)
    published = 0

    def send(events) -> None:
        nonlocal published
        pub.publish(ev.KVEventBatch(ts=time.time(), events=events))
        published += 1

    def drain() -> None:
        pub._event_queue.join()  # every queued batch has been sent (or dropped by ZMQ)

    print("READY", flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        if op == "ping":
            send([])
            drain()
            print("OK", published, flush=True)
        elif op == "flood":
            for _ in range(int(args[0])):
                send(engine.batch())
            drain()
            print("DONE", published, flush=True)
        elif op == "clear":
            engine.held.clear()
            engine.chunks.clear()
            send([ev.AllBlocksCleared(), engine.stored()])
            drain()
            print("OK", published, flush=True)
        elif op == "truth":
            print("TRUTH", json.dumps(sorted(engine.held)), flush=True)
        elif op == "quit":
            break
    pub.shutdown()


def main() -> None:
    cmd, wheel, dest = sys.argv[1:4]
    v = vllm_wheel.load(wheel, dest)
    if cmd == "hashes":
        cmd_hashes(v)
    elif cmd == "publish":
        endpoint, replay, seed = sys.argv[4:7]
        cmd_publish(v, endpoint, replay, int(seed))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
