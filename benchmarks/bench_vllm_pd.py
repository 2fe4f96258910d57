"""Disaggregated vLLM: KvxferConnector against vLLM's NixlConnector, same machine, one run.

    .venv-vllm/bin/python benchmarks/bench_vllm_pd.py [--requests 20] [--tokens 1000 4000]

For each connector: a prefill and a decode API server (same flags), then per prompt
length ``--requests`` prompts through the proxy flow (prefill with max_tokens=1 and
kv_transfer_params={"do_remote_decode": true}, then decode with what prefill answered).
Reported, medians: the decode server's time to first token (its request with
max_tokens=1, transfer included) and the transfer time by the connector's own Prometheus
histogram (kvxfer:kv_transfer_latency_seconds, vllm:nixl_xfer_time_seconds). The model
is a random Llama with 8 layers, 8 KV heads of 128, fp32: 64 KiB of KV per token, 64 MiB
for 1000 tokens. NixlConnector needs `pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import hf_tiny_llama as tiny_llama  # noqa: E402
from vllm_proxy import post  # noqa: E402

CONNECTORS = {
    "kvxfer": ({"kv_connector": "KvxferConnector",
                "kv_connector_module_path": "kvxfer.integrations.vllm", "kv_role": "kv_both"},
               "kvxfer:kv_transfer_latency_seconds"),
    "nixl": ({"kv_connector": "NixlConnector", "kv_role": "kv_both",
              "kv_buffer_device": "cpu"}, "vllm:nixl_xfer_time_seconds"),
}


def serve(model: str, port: int, kv: dict, side_port: int, log: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="4",
               UCX_TLS="self,sm,tcp", UCX_NET_DEVICES="lo",
               VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
               VLLM_NIXL_SIDE_CHANNEL_PORT=str(side_port))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", str(port), "--dtype", "float32", "--block-size", "32",
           "--max-model-len", "8192", "--enforce-eager", "--no-enable-prefix-caching",
           "--kv-transfer-config", json.dumps(kv)]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def healthy(port: int, timeout: float = 1800) -> None:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"server on {port} never became healthy")


def histogram_sum_count(port: int, name: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if m := re.match(re.escape(name) + r"_(sum|count)\{.*\} ([0-9.eE+-]+)", line):
            if m.group(1) == "sum":
                total += float(m.group(2))
            else:
                count += float(m.group(2))
    return total, count


def run(name: str, model: str, lengths: list[int], n: int, logs: str) -> dict:
    kv, metric = CONNECTORS[name]
    procs = [serve(model, 8100, kv, 5600, f"{logs}/{name}-prefill.log"),
             serve(model, 8200, kv, 5700, f"{logs}/{name}-decode.log")]
    try:
        healthy(8100)
        healthy(8200)
        rows = {}
        rng = random.Random(0)
        for length in lengths:
            ttft, xfer = [], []
            for i in range(n + 1):  # the first is a warm-up, not counted
                prompt = [rng.randrange(3, 512) for _ in range(length)]
                body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                first = post("http://127.0.0.1:8100/v1/completions",
                             dict(body, kv_transfer_params={"do_remote_decode": True}))
                s0, c0 = histogram_sum_count(8200, metric)
                t0 = time.perf_counter()
                post("http://127.0.0.1:8200/v1/completions",
                     dict(body, kv_transfer_params=first["kv_transfer_params"]))
                dt = time.perf_counter() - t0
                time.sleep(1.5)  # stats reach /metrics on vLLM's logging interval
                s1, c1 = histogram_sum_count(8200, metric)
                if i:
                    ttft.append(dt)
                    if c1 > c0:
                        xfer.append((s1 - s0) / (c1 - c0))
            rows[length] = (statistics.median(ttft),
                            statistics.median(xfer) if xfer else float("nan"))
        return rows
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--connectors", nargs="+", default=["kvxfer", "nixl"])
    a = ap.parse_args()
    model = tiny_llama.build(os.path.join(tempfile.gettempdir(), "kvxfer-bench-llama"),
                             layers=8, hidden=1024, heads=8, kv_heads=8, head_dim=128)
    logs = tempfile.mkdtemp(prefix="bench_vllm_pd-")
    results = {c: run(c, model, a.tokens, a.requests, logs) for c in a.connectors}
    print(f"{'tokens':>7} {'KV MiB':>7} " + " ".join(
        f"{c + ' TTFT ms':>16} {c + ' xfer ms':>16}" for c in a.connectors) + "  TTFT ratio")
    for length in a.tokens:
        cells = []
        for c in a.connectors:
            t, x = results[c][length]
            cells.append(f"{t * 1e3:16.1f} {x * 1e3:16.1f}")
        ratio = (results["kvxfer"][length][0] / results["nixl"][length][0]
                 if {"kvxfer", "nixl"} <= set(results) else float("nan"))
        print(f"{length:7d} {length * 64 / 1024:7.1f} " + " ".join(cells) + f"  {ratio:10.2f}")
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
