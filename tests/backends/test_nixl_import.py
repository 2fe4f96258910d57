"""The NIXL backend finds NIXL's Python API under each name its wheels use.

nixl-cu12 installs ``nixl_cu12``; the ``nixl`` meta package (and CUDA 13 machines)
expose the same API as ``nixl._api`` / ``nixl_cu13._api``. Each case runs in a fresh
interpreter whose import path hides or renames the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

nixl_cu12 = pytest.importorskip("nixl_cu12", reason="nixl-cu12 not installed (extra 'nixl')")

AGENT_PAIR = [sys.executable, os.path.join(os.path.dirname(__file__), "agent_pair.py")]


def run(argv: list[str], path: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` with ``path`` first on the import path."""
    pythonpath = os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def hide_cu12(path: Path) -> None:
    fake = path / "nixl_cu12"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: no nixl_cu12 here')\n")


def test_the_nixl_meta_package_name_is_used_when_nixl_cu12_is_absent(tmp_path: Path):
    hide_cu12(tmp_path)
    # The meta package's layout: a package ``nixl`` whose ``_api`` is NIXL's API.
    (tmp_path / "nixl").symlink_to(Path(nixl_cu12.__file__).parent, target_is_directory=True)
    out = run([*AGENT_PAIR, "nixl"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == ["moved True", "api nixl._api"]  # NIXL logs first


def test_without_any_nixl_the_backend_is_unavailable_naming_every_name_tried(tmp_path: Path):
    hide_cu12(tmp_path)
    for name in ("nixl", "nixl_cu13"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('simulated: no {name}')\n")
    code = "import kvxfer\ntry:\n    kvxfer.Agent('x', backend='nixl')\n" \
        "except kvxfer.BackendUnavailable as exc:\n    print(exc)\n"
    out = run([sys.executable, "-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("nixl_cu12._api", "nixl._api", "nixl_cu13._api", "kvxfer[nixl]"):
        assert name in out.stdout, out.stdout
