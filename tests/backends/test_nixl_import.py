"""The NIXL backend finds NIXL's Python API under each name its wheels use.

nixl-cu12 installs ``nixl_cu12``; the ``nixl`` meta package (and CUDA 13 machines)
expose the same API as ``nixl._api`` / ``nixl_cu13._api``. Each case runs in a fresh
interpreter whose import path hides or renames the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

nixl_cu12 = pytest.importorskip("nixl_cu12", reason="nixl-cu12 not installed (extra 'nixl')")

TRANSFER = textwrap.dedent("""
    import torch, kvxfer
    from kvxfer.backends import nixl
    def cache(fill):
        return kvxfer.KVLayout.vllm([torch.full((2, 8, 4, 2, 16), fill, dtype=torch.float16)
                                     for _ in range(2)])
    src, dst = cache(7.0), cache(0.0)
    with kvxfer.Agent("src", backend="nixl") as a, kvxfer.Agent("dst", backend="nixl") as b:
        a.register_kv_cache(src)
        b.register_kv_cache(dst)
        b.read(b.add_peer(a.metadata()), [1, 5], [2, 3]).wait(20)
    moved = [r.view[[2, 3]].eq(7).all().item() and r.view[[0, 1, 4]].eq(0).all().item()
             for r in dst.regions]
    print(nixl._nixl.__name__, all(moved))
""")


def run(code: str, path: Path) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


def hide_cu12(path: Path) -> None:
    fake = path / "nixl_cu12"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: no nixl_cu12 here')\n")


def test_the_nixl_meta_package_name_is_used_when_nixl_cu12_is_absent(tmp_path: Path):
    hide_cu12(tmp_path)
    # The meta package's layout: a package ``nixl`` whose ``_api`` is NIXL's API.
    (tmp_path / "nixl").symlink_to(Path(nixl_cu12.__file__).parent, target_is_directory=True)
    out = run(TRANSFER, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].split() == ["nixl._api", "True"]  # NIXL logs first


def test_without_any_nixl_the_backend_is_unavailable_naming_every_name_tried(tmp_path: Path):
    hide_cu12(tmp_path)
    for name in ("nixl", "nixl_cu13"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('simulated: no {name}')\n")
    out = run(textwrap.dedent("""
        import kvxfer
        try:
            kvxfer.Agent("x", backend="nixl")
        except kvxfer.BackendUnavailable as exc:
            print(exc)
    """), tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("nixl_cu12._api", "nixl._api", "nixl_cu13._api", "kvxfer[nixl]"):
        assert name in out.stdout, out.stdout
