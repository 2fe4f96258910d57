"""`kvxfer info`, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kvxfer
from kvxfer.backends import registered_backends


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvxfer.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_info_lists_every_registered_backend():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("kvxfer ") and "CUDA device:" in lines[0]
    names = [line.split()[0] for line in lines[2:]]
    assert names == list(registered_backends()) and {"tcp", "ucx", "nixl"} <= set(names)
    tcp = next(line for line in lines if line.startswith("tcp "))
    assert tcp.split()[1] == "yes" and "built in" in tcp


def test_info_json_says_why_a_backend_is_unusable(tmp_path: Path):
    fake = tmp_path / "ucxx"  # shadows the real ucxx: importing it fails as if missing
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: no ucxx here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = run_cli("info", "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    backends = {b["name"]: b for b in report["backends"]}
    ucx = backends["ucx"]
    assert ucx["usable"] is False and not ucx["cuda"]
    assert "ucxx" in ucx["notes"] and "pip install 'kvxfer[ucx]'" in ucx["notes"]
    assert backends["tcp"]["usable"] is True
    if not report["cuda"]:
        assert all("no CUDA device" in b["notes"] for b in backends.values() if b["usable"])


def test_info_agrees_with_what_the_agent_can_open():
    report = json.loads(run_cli("info", "--json").stdout)
    for b in report["backends"]:
        try:
            kvxfer.Agent(f"probe-{b['name']}", backend=b["name"]).close()
            opened = True
        except kvxfer.BackendUnavailable:
            opened = False
        assert opened == b["usable"], b


def test_a_command_is_required():
    out = run_cli()
    assert out.returncode == 2 and "COMMAND" in out.stderr
