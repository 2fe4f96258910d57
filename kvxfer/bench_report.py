"""Output of ``kvxfer bench``: a table per backend, JSON, CSV, and a plot (matplotlib)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields
from typing import Sequence

from .bench import BenchConfig, Row


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def table(rows: Sequence[Row], config: BenchConfig) -> str:
    """One table per backend, in the order measured."""
    out = io.StringIO()
    head = (f"{'blocks':>6} {'bytes/req':>10} {'reqs':>5} {'avg ms':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'p99.9 ms':>8} {'GB/s':>7} {'raw GB/s':>8} {'vs raw':>6} "
            f"{'bytes':>5}")
    for backend in dict.fromkeys(r.backend for r in rows):
        mine = [r for r in rows if r.backend == backend]
        transport = mine[0].transport
        print(f"{backend} {config.op}: {config.geometry.describe()}; {config.order} order, "
              f"inflight {config.inflight}, device {config.device}"
              + (f"; transport: {transport}" if transport else ""), file=out)
        print(head, file=out)
        for r in mine:
            ratio = r.gbps / r.raw_gbps if r.raw_gbps else float("nan")
            print(f"{r.blocks:>6} {_size(r.bytes_per_request):>10} {r.requests:>5} "
                  f"{r.avg_ms:>8.3f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.p999_ms:>8.3f} "
                  f"{r.gbps:>7.3f} {r.raw_gbps:>8.3f} {ratio:>6.2f} "
                  f"{'ok' if r.checked else 'BAD':>5}", file=out)
        print(file=out)
    print("raw GB/s: the same bytes per request over one plain TCP socket, one request at a "
          "time, measured in this run; bytes: a request's blocks compared by sha256 on both "
          "sides", file=out)
    return out.getvalue()


def to_json(rows: Sequence[Row], config: BenchConfig) -> str:
    conf = asdict(config)
    conf["geometry"]["block_bytes"] = config.geometry.block_bytes
    return json.dumps({"config": conf, "rows": [asdict(r) for r in rows]}, indent=2)


def to_csv(rows: Sequence[Row]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, [f.name for f in fields(Row)])
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    return out.getvalue()


def plot(rows: Sequence[Row], config: BenchConfig, path: str) -> None:
    """GB/s and p99 latency against request size, one line per backend, plus raw TCP.

    Raises:
        BackendUnavailable: matplotlib is missing (extra ``bench``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from .errors import BackendUnavailable
        raise BackendUnavailable("plot", f"matplotlib is not installed ({exc})",
                                 extra="bench") from exc
    fig, (bw, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(r.backend, []).append(r)
    for backend, mine in series.items():
        x = [r.bytes_per_request for r in mine]
        bw.plot(x, [r.gbps for r in mine], marker="o", label=backend)
        lat.plot(x, [r.p99_ms for r in mine], marker="o", label=backend)
    raw = {r.bytes_per_request: r.raw_gbps for r in rows}
    xs = sorted(raw)
    bw.plot(xs, [raw[x] for x in xs], linestyle="--", color="grey", label="raw TCP socket")
    for ax, ylabel in ((bw, "GB/s"), (lat, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per request")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    lat.set_yscale("log")
    fig.suptitle(f"kvxfer bench --op {config.op}: {config.geometry.describe()}, "
                 f"{config.order}, inflight {config.inflight}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot", "table", "to_csv", "to_json"]
