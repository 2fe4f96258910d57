"""`kvxfer bench` in local mode: the command line's main() spawns its own peer process.

main() runs in the test's process (importing torch again per test costs seconds on a
loaded machine); the peer it spawns is a real process over real sockets.
"""

from __future__ import annotations

import csv
import io
import json
import pytest

from kvxfer.bench import Geometry, models
from kvxfer.cli import main

TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--block-size", "4",
        "--dtype", "float16"]
TINY_BLOCK = 2 * 2 * 4 * 2 * 16 * 2  # layers x (K, V) x tokens x heads x head_dim x bytes


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def bench(capsys):
    def run(*args: str) -> Result:
        try:
            code = main(["bench", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            err = capsys.readouterr()
            return Result(code, err.out, err.err + str(exc.code or ""))
        got = capsys.readouterr()
        return Result(code, got.out, got.err)
    return run


def test_models_come_from_the_packaged_kv_shapes():
    geo = models()["llama-3.1-8b"]
    assert geo.block_bytes == 32 * 16 * 2 * 8 * 128 * 2  # 2 MiB per block of 16 tokens
    assert models()["deepseek-v3"].mla_latent_dim == 576
    assert Geometry("t", 2, 2, 16, 4, "float16").block_bytes == TINY_BLOCK


def test_read_sweep_reports_every_size_checks_bytes_and_plots(bench, tmp_path):
    png = tmp_path / "out.png"
    out = bench("--backend", "tcp", *TINY, "--blocks", "1,8", "--iters", "6", "--warmup", "1",
                "--json", "-", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = report["rows"]
    assert [(r["backend"], r["op"], r["blocks"]) for r in rows] == [("tcp", "read", 1),
                                                                    ("tcp", "read", 8)]
    for r in rows:
        assert r["bytes_per_request"] == r["blocks"] * TINY_BLOCK
        assert r["requests"] == 6 and r["checked"] is True
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
        assert r["gbps"] > 0 and r["raw_gbps"] > 0
    assert report["config"]["geometry"]["block_bytes"] == TINY_BLOCK
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_with_inflight_requests_in_contiguous_order_as_csv(bench):
    out = bench("--backend", "tcp", "--op", "write", *TINY, "--blocks", "4", "--iters", "8",
                "--warmup", "0", "--inflight", "3", "--order", "contiguous", "--csv", "-")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 1 and rows[0]["op"] == "write" and rows[0]["checked"] == "True"
    assert int(rows[0]["requests"]) == 8


def test_table_names_the_geometry_and_an_unknown_backend_fails_before_spawning(bench):
    out = bench("--backend", "nosuch", "--blocks", "1")
    assert out.returncode != 0 and "nosuch" in (out.stderr + out.stdout)
    out = bench("--model", "nosuch-model")
    assert out.returncode != 0 and "llama-3.1-8b" in out.stderr


@pytest.mark.parametrize("bad", [["--blocks", "0"], ["--compression", "lz4"]])
def test_bad_options_are_refused(bench, bad):
    out = bench(*bad)
    assert out.returncode == 2
