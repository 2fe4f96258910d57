"""Prefill pushes a prompt's KV to decode layer by layer, as each layer is computed.

Decode allocates blocks for the request and ships (its metadata, the block ids) to
prefill. Prefill runs its forward pass; after each layer it starts a write of that
layer's blocks with a notification naming the request and layer, and goes on computing
while the bytes move. Decode polls ``notifications()`` and could start attention on a
layer as soon as its message arrives. Prefill may reuse its blocks once every handle
is done.

    python examples/layerwise_push.py --model qwen3-8b --tokens 2048
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


def prefill(model: str, num_blocks: int, decode_meta: bytes, decode_blocks: list[int],
            layer_ms: float, result: "mp.Queue") -> None:
    geo = model_geometry(model)
    layout = make_kv_cache(geo, num_blocks, seed=1)
    my_blocks = list(range(len(decode_blocks)))  # where this engine put the prompt
    with kvxfer.Agent("prefill-0") as agent:
        agent.register_kv_cache(layout)
        decode = agent.add_peer(decode_meta)
        handles = []
        for layer in range(geo.layers):
            time.sleep(layer_ms / 1e3)  # stands in for the layer's forward pass
            handles.append(agent.write(decode, my_blocks, decode_blocks, layers=[layer],
                                       notify=f"req-7 layer {layer}".encode()))
        for h in handles:
            h.wait()  # now prefill may free or reuse my_blocks
        result.put("sent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-8b", choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layer-ms", type=float, default=2.0, help="simulated compute per layer")
    args = ap.parse_args()
    geo = model_geometry(args.model)
    nblocks = -(-args.tokens // geo.block_size)
    num_blocks = 2 * nblocks
    decode_cache = make_kv_cache(geo, num_blocks, seed=2)
    decode_blocks = list(range(num_blocks - 1, num_blocks - 1 - nblocks, -1))  # any free ones

    with kvxfer.Agent("decode-0") as agent:
        agent.register_kv_cache(decode_cache)
        ctx = mp.get_context("spawn")
        result = ctx.Queue()
        proc = ctx.Process(target=prefill, args=(args.model, num_blocks, agent.metadata(),
                                                 decode_blocks, args.layer_ms, result))
        t0 = time.perf_counter()
        proc.start()
        arrived: dict[int, float] = {}
        while len(arrived) < geo.layers and time.perf_counter() - t0 < 120:
            for peer, message in agent.notifications():
                layer = int(message.decode().rsplit(" ", 1)[1])
                arrived[layer] = time.perf_counter() - t0
            time.sleep(0.0005)
        print(result.get(timeout=60), f"by prefill; decode saw {len(arrived)} layers")
        proc.join(30)

    expected = make_kv_cache(geo, num_blocks, seed=1)
    prompt = list(range(nblocks))
    for mine, theirs in zip(decode_cache.regions, expected.regions):
        if not torch.equal(mine.view[decode_blocks].view(torch.uint8),
                           theirs.view[prompt].view(torch.uint8)):
            print(f"MISMATCH in layer {mine.layer} {mine.part}")
            return 1
    if sorted(arrived) != list(range(geo.layers)):
        print("missing layer notifications")
        return 1
    first, last = arrived[0], arrived[geo.layers - 1]
    print(f"{args.model}: {args.tokens} tokens, {geo.layers} layers; layer i arrived as prefill "
          f"computed it ({args.layer_ms} ms each): layers 0..{geo.layers - 1} landed over "
          f"{(last - first) * 1e3:.1f} ms; every byte checked: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
