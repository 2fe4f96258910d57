"""The CUDA kernel must build: nvcc for sm_90 (CI has nvcc 13.0) and, where libnvrtc is
present, NVRTC itself with the options the runtime uses. No GPU is needed for either.

A kernel that does not compile fails here, in CI, rather than at a user's first pack.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from kvxfer.packing import cuda as pcuda

ENTRIES = [f"kv_{d}_w{w}" for d in ("pack", "unpack") for w in pcuda.WIDTHS]


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)")


@pytest.fixture(scope="module")
def runtime_source(tmp_path_factory) -> Path:
    """The exact text the runtime hands to NVRTC, written to a .cu file."""
    path = tmp_path_factory.mktemp("nvrtc") / "kv_pack_runtime.cu"
    path.write_text(pcuda.kernel_source())
    return path


def _compile(src: Path, out: Path, kind: str) -> str:
    cmd = [_nvcc(), "-arch=sm_90", f"-{kind}", "-o", str(out), *pcuda.NVRTC_OPTIONS,
           "-Werror", "all-warnings", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage", str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@needs_nvcc
def test_nvcc_builds_runtime_source_for_sm90_without_warnings_or_spills(runtime_source, tmp_path):
    report = _compile(runtime_source, tmp_path / "kv_pack.cubin", "cubin")
    assert (tmp_path / "kv_pack.cubin").stat().st_size > 0
    for entry in ENTRIES:
        assert f"Compiling entry function '{entry}'" in report, entry
    assert not re.search(r"[1-9]\d* bytes spill", report), report
    assert not re.search(r"[1-9]\d* bytes stack frame", report), report


@needs_nvcc
def test_nvcc_builds_the_csrc_file_and_the_wide_kernels_use_16_byte_accesses(tmp_path):
    top = Path(__file__).resolve().parents[1] / "csrc" / "kv_pack.cu"
    _compile(top, tmp_path / "kv_pack.ptx", "ptx")
    ptx = (tmp_path / "kv_pack.ptx").read_text()
    bodies = dict(re.findall(r"\.entry (\w+)\((.*?)\n}\n", ptx, flags=re.S))
    assert sorted(bodies) == sorted(ENTRIES)
    for entry in ("kv_pack_w16", "kv_unpack_w16"):
        assert re.search(r"\bld(\.global)?(\.nc)?\.v2\.u64", bodies[entry]), entry
        assert re.search(r"\bst(\.global)?\.v2\.u64", bodies[entry]), entry


def _libnvrtc() -> str | None:
    roots = [sysconfig.get_paths()["purelib"], "/usr/local/cuda/lib64", "/usr/local/cuda/lib"]
    for root in roots:
        for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/*/lib/libnvrtc.so*",
                        "libnvrtc.so*"):
            hits = [h for h in sorted(glob.glob(os.path.join(root, pattern)))
                    if "builtins" not in h and "alt" not in h]
            if hits:
                return hits[0]
    return None


@pytest.mark.skipif(_libnvrtc() is None,
                    reason="libnvrtc not found (pip install nvidia-cuda-nvrtc to run this)")
def test_nvrtc_compiles_runtime_source():
    """What cupy.RawModule does at run time, minus the GPU: NVRTC, same text and options."""
    path = _libnvrtc()
    for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by soname
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    src = pcuda.kernel_source().encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kv_pack.cu", 0, None, None) == 0
    opts = [o.encode() for o in (*pcuda.NVRTC_OPTIONS, "-ftz=true", "-arch=compute_90")]
    argv = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode(errors="replace")
    assert "warning" not in log.value.decode(errors="replace").lower(), log.value
