"""Disaggregated prefill -> decode hand-off of one prompt's KV cache, in two processes.

The prefill process owns a KV cache shaped like a real model and "computes" a prompt
into some of its blocks. It ships its agent metadata to the decode process (here over a
multiprocessing queue; an engine would use its own control plane). The decode process
pulls the prompt's blocks into blocks of its own choosing, layer by layer, checks every
byte, and reports the throughput.

    python examples/transfer_two_process.py --model llama-3.1-8b --tokens 4096
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvxfer  # noqa: E402
from kv_models import MODELS, make_kv_cache, model_geometry  # noqa: E402


def prefill(model: str, num_blocks: int, backend: str, q: "mp.Queue", done: "mp.Event") -> None:
    layout = make_kv_cache(model_geometry(model), num_blocks, seed=1)
    with kvxfer.Agent("prefill-0", backend=backend) as agent:
        agent.register_kv_cache(layout)
        q.put(agent.metadata())
        done.wait(300)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length")
    ap.add_argument("--backend", default="tcp")
    args = ap.parse_args()
    geo = model_geometry(args.model)
    prompt_blocks = -(-args.tokens // geo.block_size)
    num_blocks = 2 * prompt_blocks  # room for other requests on both sides

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=prefill, args=(args.model, num_blocks, args.backend, q, done))
    proc.start()
    try:
        meta = q.get(timeout=120)
        decode_cache = make_kv_cache(geo, num_blocks, seed=2)
        gen = torch.Generator().manual_seed(0)
        # The prefill engine's block table for the prompt, and the blocks decode allocated.
        remote = torch.randperm(num_blocks, generator=gen)[:prompt_blocks].tolist()
        local = torch.randperm(num_blocks, generator=gen)[:prompt_blocks].tolist()
        with kvxfer.Agent("decode-0", backend=args.backend) as agent:
            agent.register_kv_cache(decode_cache)
            peer = agent.add_peer(meta)
            agent.read(peer, remote[:1], local[:1]).wait()  # warm the connection
            t0 = time.perf_counter()
            handle = agent.read(peer, remote, local)
            handle.wait_layer(0)
            t_first = time.perf_counter() - t0
            handle.wait()
            elapsed = time.perf_counter() - t0
        expected = make_kv_cache(geo, num_blocks, seed=1)  # what prefill holds
        for mine, theirs in zip(decode_cache.regions, expected.regions):
            if not torch.equal(mine.view[local].view(torch.uint8),
                               theirs.view[remote].view(torch.uint8)):
                print(f"MISMATCH in layer {mine.layer} {mine.part}")
                return 1
    finally:
        done.set()
        proc.join(30)
    nbytes = handle.nbytes
    print(f"{args.model}: {args.tokens} tokens, {prompt_blocks} blocks of {geo.block_size}, "
          f"{geo.layers} layers, {nbytes / 2**20:.1f} MiB over {args.backend}")
    print(f"layer 0 ready after {t_first * 1e3:.2f} ms; all layers in {elapsed * 1e3:.2f} ms "
          f"= {nbytes / elapsed / 1e9:.2f} GB/s; every byte checked: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
