"""Benchmark kvxfer.packing on a GPU: the kernel vs a per-layer torch loop vs a plain copy.

    PYTHONPATH=. python benchmarks/bench_packing.py [--layers 32 80] [--blocks 64 ... 4096]
    PYTHONPATH=. python benchmarks/bench_packing.py --device cpu   # CPU reference figures

Cache: vLLM NHD, bf16, 16-token blocks of 8 KV heads x 128 (32 KiB per block per K/V).
Block ids are a random unsorted sample of the cache. For each size:

  pack / unpack   kvxfer.packing (the CUDA kernel, one launch for all layers and K/V)
  torch loop      per (layer, K|V): index_select into / index_copy_ out of the chunk, in
                  the cache's dtype (what an engine writes without a packing kernel)
  copy            one device-to-device copy of the same number of bytes (the ceiling)

GB/s counts bytes read plus bytes written (2 x chunk bytes); "of copy" is the kernel's
rate over the copy's; "x loop" is the kernel's speed-up over the torch loop. Times are
medians of CUDA-event timings after warm-up. Each kernel result is checked byte for byte
against the torch loop before it is timed. On the CPU the same table compares the torch
reference with a per-block Python loop (one copy per block per layer and part).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from kvxfer.layout import KVLayout
from kvxfer.packing import pack, packed_nbytes, unpack

TOKENS, HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16


def _time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn, by CUDA events on a GPU and perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _loop_fns(cache: list[torch.Tensor], ids: torch.Tensor, chunk: torch.Tensor, device: str):
    """The baseline: per-layer torch ops on GPU, per-block copies on the CPU."""
    per = chunk.view(DTYPE).view(len(cache), 2, len(ids), TOKENS, HEADS, HEAD_DIM)
    if device == "cuda":
        def loop_pack():
            for l, t in enumerate(cache):
                for p in range(2):
                    torch.index_select(t[p], 0, ids, out=per[l, p])

        def loop_unpack():
            for l, t in enumerate(cache):
                for p in range(2):
                    t[p].index_copy_(0, ids, per[l, p])
        return loop_pack, loop_unpack
    id_list = ids.tolist()

    def block_pack():
        for l, t in enumerate(cache):
            for p in range(2):
                for j, b in enumerate(id_list):
                    per[l, p, j].copy_(t[p, b])

    def block_unpack():
        for l, t in enumerate(cache):
            for p in range(2):
                for j, b in enumerate(id_list):
                    t[p, b].copy_(per[l, p, j])
    return block_pack, block_unpack


def bench(layers: int, block_counts: list[int], device: str, reps: int) -> list[dict]:
    spare = 256
    total = max(block_counts) + spare
    gen = torch.Generator().manual_seed(layers)
    cache = [torch.empty(2, total, TOKENS, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
             for _ in range(layers)]
    for t in cache:  # random data, never zeros
        t.view(torch.int16).random_(generator=None)
    layout = KVLayout.vllm(cache, "NHD")
    rows = []
    chunk_all = torch.empty(packed_nbytes(layout, max(block_counts)), dtype=torch.uint8,
                            device=device)
    copy_dst = torch.empty_like(chunk_all)
    for n in block_counts:
        ids_host = torch.randperm(total, generator=gen)[:n]  # as ids arrive off the wire
        ids = ids_host.to(device)  # the torch loop indexes with a device tensor
        nbytes = packed_nbytes(layout, n)
        chunk, check = chunk_all[:nbytes], copy_dst[:nbytes]
        loop_pack, loop_unpack = _loop_fns(cache, ids, check, device)
        check.fill_(0x5A)
        loop_pack()
        chunk.fill_(0xA5)
        pack(layout, ids_host, out=chunk)
        if not torch.equal(chunk, check):
            raise SystemExit(f"pack differs from the torch loop at {layers} layers x {n} blocks")
        r = dict(layers=layers, blocks=n, mib=nbytes / 2**20)
        r["pack"] = _time_ms(lambda: pack(layout, ids_host, out=chunk), device, reps)
        r["unpack"] = _time_ms(lambda: unpack(layout, ids_host, None, chunk), device, reps)
        r["loop_pack"] = _time_ms(loop_pack, device, max(3, reps // 4))
        r["loop_unpack"] = _time_ms(loop_unpack, device, max(3, reps // 4))
        r["copy"] = _time_ms(lambda: check.copy_(chunk), device, reps)
        rows.append(r)
        _print_row(r, nbytes)
    if device == "cuda" and 1024 in block_counts:
        _pinned_row(layout, total, gen, reps)
    return rows


def _gbps(nbytes: int, ms: float) -> float:
    return 2 * nbytes / (ms * 1e-3) / 1e9


HEADER = (f"{'layers':>6} {'blocks':>6} {'MiB':>8} | {'pack GB/s':>9} {'of copy':>7} "
          f"{'x loop':>6} | {'unpack GB/s':>11} {'of copy':>7} {'x loop':>6} | "
          f"{'loop p/u GB/s':>14} | {'copy GB/s':>9}")


def _print_row(r: dict, nbytes: int) -> None:
    copy = _gbps(nbytes, r["copy"])
    pk, up = _gbps(nbytes, r["pack"]), _gbps(nbytes, r["unpack"])
    print(f"{r['layers']:>6} {r['blocks']:>6} {r['mib']:>8.1f} | {pk:>9.1f} {pk / copy:>7.1%} "
          f"{r['loop_pack'] / r['pack']:>6.1f} | {up:>11.1f} {up / copy:>7.1%} "
          f"{r['loop_unpack'] / r['unpack']:>6.1f} | "
          f"{_gbps(nbytes, r['loop_pack']):>6.1f}/{_gbps(nbytes, r['loop_unpack']):<7.1f} | "
          f"{copy:>9.1f}", flush=True)


def _pinned_row(layout: KVLayout, total: int, gen: torch.Generator, reps: int) -> None:
    """Pack straight into pinned host memory vs a device pack then a D2H copy."""
    ids = torch.randperm(total, generator=gen)[:1024]
    nbytes = packed_nbytes(layout, 1024)
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=layout.device)
    direct = _time_ms(lambda: pack(layout, ids, out=host), "cuda", max(3, reps // 4))
    staged = _time_ms(lambda: host.copy_(pack(layout, ids, out=dev), non_blocking=True),
                      "cuda", max(3, reps // 4))
    d2h = _time_ms(lambda: host.copy_(dev, non_blocking=True), "cuda", max(3, reps // 4))
    gb = nbytes / 1e9
    print(f"pinned host, {layout.num_layers} layers x 1024 blocks ({gb:.2f} GB, bytes counted "
          f"once): pack->pinned {gb / direct * 1e3:.1f} GB/s, pack->device + D2H "
          f"{gb / staged * 1e3:.1f} GB/s, D2H copy alone {gb / d2h * 1e3:.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--blocks", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench_packing: no CUDA GPU here; this benchmark needs one (or run it with "
                  "--device cpu for the CPU reference figures)", file=sys.stderr)
            return 2
        from kvxfer.packing import cuda as pcuda
        if not pcuda.available():
            print("bench_packing: cupy is missing: pip install 'kvxfer[cuda]'", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    layers = args.layers or ([32, 80] if args.device == "cuda" else [4])
    blocks = args.blocks or ([64, 128, 256, 512, 1024, 2048, 4096] if args.device == "cuda"
                             else [16, 64, 256])
    print(f"cache: vLLM NHD {DTYPE}, {TOKENS} tokens x {HEADS} heads x {HEAD_DIM} per block "
          f"({TOKENS * HEADS * HEAD_DIM * 2} B per block per K/V); medians of {args.reps}")
    print(HEADER)
    for n_layers in layers:
        bench(n_layers, blocks, args.device, args.reps)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
