"""Codec benchmark on real KV (MiniLM-L6 K/V over English text, benchmarks/real_kv.py).

    python benchmarks/bench_codec.py codec            # ratio and speed per dtype
    python benchmarks/bench_codec.py link [--rounds 3] [--rates 1gbit,10gbit]   # root

``codec``: each candidate on 4 MiB chunks of real KV, one thread; medians over chunks.
``link``: two processes in two network namespaces (``kvc-`` prefix) over a veth shaped
with tc (tbf) to each rate; a 512 MiB read of real bf16 KV (a vLLM NHD cache of
MiniLM-L6's geometry, every layer's own K and V) with compression none / lz4 / zstd /
auto, the settings alternated within each round, all in one run. Prints a table of
median effective rates (raw bytes / wall time of the read) and their ratios to none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
from real_kv import real_kv, real_kv_bytes  # noqa: E402

CHUNK = 4 << 20
MODES = ["none", "lz4", "zstd", "auto"]
BLOCK = 16


# ------------------------------------------------------------------ codec table
def _time(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def codec_table(n_chunks: int = 8) -> None:
    import blosc2
    import lz4.block
    import numcodecs
    import bitshuffle
    from kvxfer import codec as C
    from kvxfer.protocol import Encoding

    blosc2.set_nthreads(1)

    def lz4c(b):
        return lz4.block.compress(b, store_size=False)

    cands = {
        "lz4 alone": lambda a, e: lz4c(a),
        "byte shuffle (numcodecs) + lz4 (lz4 pkg)":
            lambda a, e: lz4c(numcodecs.Shuffle(e).encode(a)),
        "bit shuffle (bitshuffle) + lz4 (lz4 pkg)":
            lambda a, e: lz4c(bitshuffle.bitshuffle(a.view(f"u{e}"))),
        "bit shuffle + lz4-1 (blosc2) [kvxfer lz4]":
            lambda a, e: C.encode(memoryview(a), C.LZ4, e)[0],
        "byte shuffle + zstd-1 (blosc2) [kvxfer zstd]":
            lambda a, e: C.encode(memoryview(a), C.ZSTD, e)[0],
    }
    shuffles = {"numcodecs.Shuffle (byte)": lambda a, e: numcodecs.Shuffle(e).encode(a),
                "bitshuffle.bitshuffle (bit)":
                    lambda a, e: bitshuffle.bitshuffle(a.view(f"u{e}"))}
    print(f"real KV: MiniLM-L6, {real_kv(torch.float32).shape[2]} tokens of English text; "
          f"{n_chunks} chunks of {CHUNK >> 20} MiB per dtype, one thread; medians")
    print(f"{'dtype':<6} {'codec':<46} {'ratio':>6} {'comp MB/s':>10} {'dec MB/s':>9}")
    for dt in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        e = dt.itemsize
        data = real_kv_bytes(dt, CHUNK * n_chunks).numpy()
        chunks = [data[i * CHUNK:(i + 1) * CHUNK] for i in range(n_chunks)]
        for name, fn in cands.items():
            ratios, cs, ds = [], [], []
            for c in chunks:
                out = fn(c, e)
                ratios.append(CHUNK / len(out))
                cs.append(CHUNK / _time(lambda: fn(c, e)) / 1e6)
                if "kvxfer" in name:
                    codec = C.LZ4 if "lz4" in name else C.ZSTD
                    enc = Encoding(codec, C.SHUFFLE_BIT if codec == C.LZ4 else C.SHUFFLE_BYTE,
                                   e, CHUNK)
                    ds.append(CHUNK / _time(lambda: C.decode(out, enc)) / 1e6)
            dec = f"{statistics.median(ds):9.0f}" if ds else f"{'-':>9}"
            print(f"{str(dt)[6:]:<6} {name:<46} {statistics.median(ratios):6.3f} "
                  f"{statistics.median(cs):10.0f} {dec}")
        for name, fn in shuffles.items():
            if e == 1 and "byte" in name:
                continue
            s = statistics.median(CHUNK / _time(lambda: fn(c, e)) / 1e6 for c in chunks)
            print(f"{str(dt)[6:]:<6} {'  shuffle only: ' + name:<46} {'':>6} {s:10.0f}")


# ------------------------------------------------------------------- link runs
def nhd_cache(nbytes: int) -> list[torch.Tensor]:
    """A vLLM NHD cache of MiniLM-L6's geometry (6 layers, 12 heads of 32, bf16,
    blocks of 16 tokens) of about ``nbytes``, holding the real K and V of each layer
    (the tokens repeated to fill it)."""
    kv = real_kv(torch.bfloat16)  # [6, 2, tokens, 12, 32]
    layers, _, tokens, heads, dim = kv.shape
    blocks = nbytes // (layers * 2 * BLOCK * heads * dim * 2)
    reps = -(-blocks * BLOCK // tokens)
    out = []
    for layer in range(layers):
        full = kv[layer].repeat(1, reps, 1, 1)[:, :blocks * BLOCK]
        out.append(full.reshape(2, blocks, BLOCK, heads, dim).contiguous())
    return out


def serve(address: str) -> None:
    import kvxfer

    with kvxfer.Agent("codec-src", listen=address) as agent:
        agent.register_kv_cache(kvxfer.KVLayout.vllm(nhd_cache(512 << 20)))
        print(agent.metadata().hex(), flush=True)
        sys.stdin.read()


def fetch(meta_hex: str, rounds: int) -> None:
    import kvxfer

    cache = [torch.zeros_like(t) for t in nhd_cache(512 << 20)]
    layout = kvxfer.KVLayout.vllm(cache)
    blocks = list(range(layout.num_blocks))
    results: dict[str, list[float]] = {m: [] for m in MODES}
    agents = {}
    try:
        for mode in MODES:  # one agent per setting, all connected first
            a = kvxfer.Agent(f"codec-dst-{mode}", listen="0.0.0.0:0", compression=mode,
                             transfer_timeout=600)
            a.register_kv_cache(layout)
            agents[mode] = (a, a.add_peer(bytes.fromhex(meta_hex)))
        for a, peer in agents.values():
            a.read(peer, blocks[:64], blocks[:64]).wait()  # connected and warm
        for r in range(rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                a, peer = agents[mode]
                t = time.perf_counter()
                h = a.read(peer, blocks, blocks)
                h.wait()
                results[mode].append(h.nbytes / (time.perf_counter() - t))
        print(json.dumps({"rates": results, "nbytes": h.nbytes}), flush=True)
    finally:
        for a, _ in agents.values():
            a.close()


def link(rounds: int, rates: list[str]) -> None:
    from netns import two_namespaces

    print(f"512 MiB read of real bf16 KV between two namespaces; {rounds} rounds, "
          f"medians; machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"{'link':<7} {'setting':<6} {'MB/s (median)':>14} {'x none':>7} {'x best':>7} "
          f"{'runs MB/s':>30}")
    for rate in rates:
        bits = float(rate[:-4]) * (1e9 if rate.endswith("gbit") else 1e6)
        burst = f"{max(256, int(bits / 8 / 250 / 1024))}kb"
        with two_namespaces("kvc", subnet="10.213.9", rate=rate, burst=burst) as ln:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            me = os.path.abspath(__file__)
            src = subprocess.Popen(["ip", "netns", "exec", ln["a"], sys.executable, me,
                                    "serve", f"{ln['addr_a']}:0"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env)
            try:
                meta = src.stdout.readline().strip()
                out = subprocess.run(["ip", "netns", "exec", ln["b"], sys.executable, me,
                                      "fetch", meta, "--rounds", str(rounds)],
                                     capture_output=True, text=True, env=env, timeout=3000)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                res = json.loads(out.stdout.strip().splitlines()[-1])["rates"]
            finally:
                src.stdin.close()
                src.wait(60)
        med = {m: statistics.median(v) for m, v in res.items()}
        best = max(med.values())
        for m in MODES:
            runs = " ".join(f"{x / 1e6:.0f}" for x in res[m])
            print(f"{rate:<7} {m:<6} {med[m] / 1e6:14.1f} {med[m] / med['none']:7.3f} "
                  f"{med[m] / best:7.3f} {runs:>30}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["codec", "link", "serve", "fetch"])
    ap.add_argument("arg", nargs="?")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rates", default="1gbit,10gbit")
    ns = ap.parse_args()
    if ns.what == "codec":
        codec_table()
    elif ns.what == "link":
        link(ns.rounds, ns.rates.split(","))
    elif ns.what == "serve":
        serve(ns.arg)
    else:
        fetch(ns.arg, ns.rounds)
