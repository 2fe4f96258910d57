"""Disaggregated serving on one machine: a router, a prefill worker and a decode worker.

Three processes serve a small Llama-style model (``tiny_llama.py``: plain torch, paged
attention over a vLLM-layout block cache, weights from a fixed seed):

    router ──(block hashes -> PrefixIndex <- KV events (ZMQ) of both workers)
      │ 1. alloc(request) ───────────────────────────────────▶ decode-0
      │ 2. prefill(request, decode's block table, blocks decode already holds)
      ▼                                                           ▲
    prefill-0: computes the prompt layer by layer, skipping the     │ kvxfer write_stream:
      prefix blocks its own cache holds; after layer i its KV goes ─┘ layer i as computed
      out at once (``layer_ready(i)``), only the blocks decode lacks
      │ 3. first token ──▶ router ──▶ decode-0: generates N tokens; before each layer of
                                      the first step it waits for that layer to land
                                      (``incoming(req).wait_layer(i)``)

Both workers keep a prefix cache (``block_pool.py``) and publish what it holds as vLLM KV
events; the router's index follows them, so a request whose prefix is held goes where
it is held and prefill skips those blocks. Every generated token is checked against a
single-process run of the same model. Each process serves its Prometheus metrics.

    python examples/disagg_serving.py --requests 4 --new-tokens 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORKER_TIMEOUT = 120.0  # seconds a reply from a worker may take


# ----------------------------------------------------------------- workers
def _worker(role: str, conn: Any, num_blocks: int, backend: str) -> None:
    """Body of the prefill or decode process: serve the router's commands on ``conn``."""
    import torch
    torch.set_num_threads(1)  # three processes share the cores
    import kvxfer
    import kvxfer.metrics
    from block_pool import BlockPool
    from kvxfer.prefix import AllBlocksCleared, KVEventPublisher
    from tiny_llama import TinyLlama

    model = TinyLlama()
    bs = model.config.block_size
    cache = model.new_cache(num_blocks)
    pool = BlockPool(num_blocks, bs)
    name = f"{role}-0"
    with kvxfer.Agent(name, backend=backend, metrics=True) as agent, \
            KVEventPublisher("tcp://127.0.0.1:*") as events, \
            kvxfer.metrics.serve(0, "127.0.0.1") as endpoint:
        agent.register_kv_cache(kvxfer.KVLayout.vllm(cache, kv_layout="NHD"))
        seq = -1  # the publisher numbers batches from 0

        def publish(batch: list) -> int:
            nonlocal seq
            if batch:
                events.publish(batch)
                seq += 1
            return seq

        conn.send(("ready", agent.metadata(), events.endpoint, endpoint.url))
        peer = None
        while True:
            cmd, *a = conn.recv()
            if cmd == "stop":
                conn.send(("stopped",))
                return
            if cmd == "probe":  # the router waits until its subscriber sees us
                conn.send(("seq", publish([AllBlocksCleared()])))
            elif cmd == "connect":
                peer = agent.add_peer(a[0])
                conn.send(("connected", peer.name))
            elif cmd == "alloc":  # decode: blocks for prompt + generated tokens
                rid, hashes, nblocks = a
                table, hit, evicted = pool.allocate(hashes, nblocks)
                conn.send(("table", table, hit, publish(evicted)))
            elif cmd == "prefill":
                conn.send(_prefill(model, agent, peer, cache, pool, publish, conn.send, *a))
            elif cmd == "generate":
                conn.send(_decode(model, agent, cache, pool, publish, *a))


def _prefill(model: Any, agent: Any, peer: Any, cache: list, pool: Any, publish: Any,
             reply: Any, rid: str, tokens: list[int], hashes: list[bytes], remote_table: list[int],
             remote_hit: int) -> tuple:
    bs = model.config.block_size
    nblocks = -(-len(tokens) // bs)
    # At least the last token is computed (its logits give the first token), so a
    # block holding it is never reused, as in vLLM.
    reusable = hashes[:(len(tokens) - 1) // bs]
    events: list = []
    table, hit, events = pool.allocate(reusable, nblocks)
    push = list(range(remote_hit, nblocks))  # blocks decode does not hold yet
    t0 = time.perf_counter()
    stream = agent.write_stream(peer, [table[i] for i in push],
                                [remote_table[i] for i in push],
                                request=rid.encode()) if push else None
    start = hit * bs
    logits = model.forward(tokens[start:], start, table, cache,
                           after_layer=stream.layer_ready if stream else None)
    first = int(logits.argmax())
    computed = time.perf_counter()
    reply(("first", first, hit, len(push)))  # the router starts decode while KV still lands
    nbytes = 0
    if stream is not None:
        stream.finish()
        stream.handle.wait(timeout=WORKER_TIMEOUT)
        nbytes = stream.handle.nbytes
    sent = time.perf_counter()
    events += pool.commit(hashes[:len(tokens) // bs], table, tokens)
    pool.release(table)
    return ("pushed", nbytes, (sent - t0) * 1e3, (sent - computed) * 1e3, publish(events))


def _decode(model: Any, agent: Any, cache: list, pool: Any, publish: Any, rid: str,
            tokens: list[int], hashes: list[bytes], table: list[int], first: int,
            new_tokens: int, pushed: bool) -> tuple:
    waited = 0.0
    incoming = agent.incoming(rid.encode(), peer="prefill-0") if pushed else None

    def land(layer: int) -> None:  # layer i of the pushed KV is in our blocks
        nonlocal waited
        if incoming is not None:
            t = time.perf_counter()
            incoming.wait_layer(layer, timeout=WORKER_TIMEOUT)
            waited += time.perf_counter() - t

    t0 = time.perf_counter()
    out = [first]
    while len(out) < new_tokens:
        pos = len(tokens) + len(out) - 1
        logits = model.forward([out[-1]], pos, table, cache,
                               before_layer=land if len(out) == 1 else None)
        out.append(int(logits.argmax()))
    if incoming is not None:
        incoming.wait(timeout=WORKER_TIMEOUT)  # the writer's finish has arrived too
    elapsed = time.perf_counter() - t0
    events = pool.commit(hashes[:len(tokens) // model.config.block_size], table, tokens)
    pool.release(table)
    return ("generated", out, elapsed * 1e3, waited * 1e3, publish(events))


# ------------------------------------------------------------------ router
class Worker:
    """The router's handle on one worker process."""

    def __init__(self, ctx: Any, role: str, num_blocks: int, backend: str) -> None:
        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(role, child, num_blocks, backend),
                                name=f"kvxfer-demo-{role}")
        self.proc.start()
        child.close()

    def ask(self, *cmd: Any) -> tuple:
        if cmd:
            self.conn.send(cmd)
        deadline = time.monotonic() + WORKER_TIMEOUT
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.role} worker died (exit {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} worker did not answer {cmd[:1]}")
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("stop")
            except (OSError, RuntimeError, TimeoutError, EOFError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def make_requests(n: int, seed: int, vocab: int) -> list[list[int]]:
    """Prompts that share a system prompt; every third one continues an earlier one
    (a later turn of the same chat), filled in with its answer at run time."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(0, vocab, (k,), generator=gen).tolist()  # noqa: E731
    system = rand(72)
    return [system + rand(int(torch.randint(20, 90, (1,), generator=gen))) for _ in range(n)]


def scrape(url: str) -> dict[str, float]:
    """One HTTP scrape of a Prometheus endpoint: ``series -> value``."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--blocks", type=int, default=256, help="KV blocks per worker")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch
    torch.set_num_threads(1)
    import kvxfer.metrics
    from kvxfer.prefix import BlockHasher, KVEventSubscriber, PrefixIndex, route
    from tiny_llama import TinyLlama, TinyLlamaConfig, generate_single_process

    cfg = TinyLlamaConfig()
    bs = cfg.block_size
    ctx = mp.get_context("spawn")
    workers = {role: Worker(ctx, role, args.blocks, args.backend) for role in ("prefill", "decode")}
    index = PrefixIndex(metrics=True)
    subs: list = []
    results = []
    try:
        ready = {role: w.ask() for role, w in workers.items()}
        endpoint = kvxfer.metrics.serve(0, "127.0.0.1")
        for role, (_, _, pub, url) in ready.items():
            sub = KVEventSubscriber(index, f"{role}-0", pub).start()
            subs.append(sub)
            while not sub.wait_applied(workers[role].ask("probe")[1], 0.2):
                pass  # a PUB drops what it sends before the SUB has joined
        applied = dict(zip(workers, subs))
        workers["prefill"].ask("connect", ready["decode"][1])
        print(f"router, prefill-0, decode-0 up over {args.backend} in "
              f"{time.perf_counter() - t_start:.1f} s; metrics: router {endpoint.url}, "
              f"prefill {ready['prefill'][3]}, decode {ready['decode'][3]}")
        print(f"model: {cfg.layers} layers, {cfg.kv_heads} KV heads x {cfg.head_dim}, "
              f"blocks of {bs} tokens, {cfg.dtype}; KV {2 * cfg.layers * cfg.kv_heads * cfg.head_dim * 4} "
              "bytes per token")
        print("reused: prefix blocks prefill skipped; pushed: blocks written to decode layer "
              "by layer;\npush ms: first layer sent -> all acknowledged (overlaps compute); "
              "exposed: after the last layer was computed;\ndecode starts on the first token and "
              "waits before layer i of its first step until layer i of the push has landed")
        print(f"{'req':<5} {'prompt':>6} {'routed to':<10} {'held':>4} {'reused':>6} "
              f"{'pushed':>6} {'KiB':>6} {'TTFT ms':>8} {'push ms':>8} {'exposed':>8} "
              f"{'decode ms':>9} {'(waiting for KV)':>16}")
        hasher = BlockHasher(block_size=bs)
        prompts = make_requests(args.requests, args.seed, cfg.vocab)
        for r in range(args.requests):
            tokens = prompts[r]
            if r % 3 == 2:  # a later turn of request r-2's chat: its prompt, answer, more
                tokens = prompts[r - 2] + results[r - 2]["tokens"] + tokens[72:]
            rid = f"req-{r}"
            t0 = time.perf_counter()
            hashes = hasher.hash_blocks(tokens)
            decision = route(index, hashes, loads={"prefill-0": 0.0})
            nblocks = -(-(len(tokens) + args.new_tokens) // bs)
            _, table, decode_hit, seq = workers["decode"].ask("alloc", rid, hashes, nblocks)
            applied["decode"].wait_applied(seq, 10)
            _, first, reused, pushed = workers["prefill"].ask(
                "prefill", rid, tokens, hashes, table, decode_hit)
            ttft = (time.perf_counter() - t0) * 1e3
            workers["decode"].conn.send(("generate", rid, tokens, hashes, table, first,
                                         args.new_tokens, pushed > 0))
            _, nbytes, xfer_ms, exposed_ms, seq = workers["prefill"].ask()
            applied["prefill"].wait_applied(seq, 10)
            _, out, decode_ms, waited_ms, seq = workers["decode"].ask()
            applied["decode"].wait_applied(seq, 10)
            results.append(dict(rid=rid, prompt=tokens, tokens=out, reused=reused, pushed=pushed, nbytes=nbytes,
                                ttft=ttft, xfer=xfer_ms, exposed=exposed_ms, decode=decode_ms,
                                waited=waited_ms,
                                blocks=len(hashes)))
            print(f"{rid:<5} {len(tokens):>6} {decision.worker:<10} "
                  f"{decision.overlap.blocks:>4} {reused:>6} {pushed:>6} {nbytes / 1024:>6.0f} "
                  f"{ttft:>8.1f} {xfer_ms:>8.1f} {exposed_ms:>8.1f} {decode_ms:>9.1f} "
                  f"{waited_ms:>16.1f}")
        prefill_metrics = scrape(ready["prefill"][3])
    finally:
        for sub in subs:
            sub.close()
        for w in workers.values():
            w.stop()
    return report(args, results, prefill_metrics, endpoint, TinyLlama(cfg),
                  generate_single_process, t_start)


def report(args: Any, results: list[dict], prefill_metrics: dict, endpoint: Any, model: Any,
           reference: Any, t_start: float) -> int:
    """Check every token against one process, print the summary; 0 if all agree."""
    router = scrape(endpoint.url)
    endpoint.close()
    bad = 0
    for r in results:
        want = reference(model, r["prompt"], args.new_tokens)
        if want != r["tokens"]:
            bad += 1
            print(f"{r['rid']}: MISMATCH: disaggregated {r['tokens']} != single process {want}")
    pushed = sum(r["nbytes"] for r in results)
    series = 'kvxfer_kv_transfer_bytes_total{backend="%s",op="write"}' % args.backend
    scraped = prefill_metrics.get(series, 0.0)
    ratio = router.get("kvxfer_kv_cache_hit_ratio", float("nan"))
    reused = sum(r["reused"] for r in results)
    total = sum(r["blocks"] for r in results)
    print(f"{len(results)} requests, {sum(len(r['tokens']) for r in results)} tokens generated; "
          f"prefix blocks reused {reused} of {total} full prompt blocks; router cache hit "
          f"ratio {ratio:.2f} (kvxfer_kv_cache_hit_ratio)")
    print(f"KV pushed prefill -> decode: {pushed / 1024:.0f} KiB; prefill's "
          f"kvxfer_kv_transfer_bytes_total (scraped): {scraped / 1024:.0f} KiB"
          f"{'' if scraped == pushed else '  MISMATCH'}")
    if bad or scraped != pushed:
        print(f"FAILED: {bad} requests differ from the single-process run")
        return 1
    print(f"every generated token matches a single-process run: OK "
          f"({time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
