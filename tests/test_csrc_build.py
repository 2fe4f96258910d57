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


# ------------------------------------------------ the kernel's logic, run on the host
# With no barriers and no shared memory, a grid is correct iff running its threads one
# after another is: this harness compiles kv_pack.cu as plain C++ (CUDA keywords
# defined away, blockIdx/threadIdx as globals) and runs every thread of the launch the
# runtime would make, so the kernel's indexing is checked byte for byte without a GPU.
HARNESS = r"""
#include <cstdint>
struct kv_dim3 { unsigned x, y, z; };
static kv_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __isGlobal(p) true
#define __builtin_assume(x) ((void)0)
struct ulonglong2 { unsigned long long x, y; };
template <typename T> inline T __ldg(const T* p) { return *p; }
#include KV_PACK_CU
typedef void (*kv_fn)(unsigned long long, unsigned long long, unsigned long long, int, int,
                      int, long long, long long, long long);
extern "C" int kv_emulate(int gather, int width, unsigned grid, unsigned threads,
                          unsigned long long table, unsigned long long ids,
                          unsigned long long packed, int r, int b, int s,
                          long long off, long long pitch, long long bytes) {
  kv_fn fn = 0;
  switch (width) {
    case 16: fn = gather ? kv_pack_w16 : kv_unpack_w16; break;
    case 8: fn = gather ? kv_pack_w8 : kv_unpack_w8; break;
    case 4: fn = gather ? kv_pack_w4 : kv_unpack_w4; break;
    case 2: fn = gather ? kv_pack_w2 : kv_unpack_w2; break;
    case 1: fn = gather ? kv_pack_w1 : kv_unpack_w1; break;
    default: return 1;
  }
  blockDim.x = threads; gridDim.x = grid;
  for (unsigned bx = 0; bx < grid; ++bx)
    for (unsigned tx = 0; tx < threads; ++tx) {
      blockIdx.x = bx; threadIdx.x = tx;
      fn(table, ids, packed, r, b, s, off, pitch, bytes);
    }
  return 0;
}
"""


@pytest.fixture(scope="module")
def emulator(runtime_source):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to run the kernel's logic on the CPU")
    harness = runtime_source.parent / "harness.cpp"
    harness.write_text(HARNESS)
    lib_path = runtime_source.parent / "kv_emulate.so"
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           f'-DKV_PACK_CU="{runtime_source}"', "-o", str(lib_path), str(harness)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(lib_path))
    lib.kv_emulate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                               *[ctypes.c_ulonglong] * 3, *[ctypes.c_int] * 3,
                               *[ctypes.c_longlong] * 3]
    return lib


def _emulate(lib, plan, packed, gather: bool, num_sms: int = 2) -> int:
    import torch
    table = torch.tensor([r.base for r in plan.regions] + [r.block_stride for r in plan.regions],
                         dtype=torch.int64)
    width = pcuda.access_width(plan, packed.data_ptr())
    grid, threads = pcuda.launch_config(plan, width, num_sms)
    # the runtime's own argument tuple, checked against the C signature's widths
    args = pcuda.kernel_args(plan, table.data_ptr(), plan.ids.data_ptr(), packed.data_ptr())
    for arg, ctype in zip(args, lib.kv_emulate.argtypes[4:], strict=True):
        assert arg.dtype.itemsize == ctypes.sizeof(ctype), (arg, ctype)
    assert lib.kv_emulate(int(gather), width, grid, threads, *(int(a) for a in args)) == 0
    return width


@pytest.mark.parametrize("order,head_dim,tokens,kv_dim", [
    ("NHD", 8, 4, 0), ("HND", 8, 4, 1), ("NHD", 3, 5, 1), ("HND", 3, 5, 0), ("NHD", 64, 16, 0)])
def test_kernel_logic_on_host_matches_reference(emulator, order, head_dim, tokens, kv_dim):
    import random

    import torch

    from kvxfer.layout import KVLayout
    from kvxfer.packing.pack_plan import make_plan
    from kvxfer.packing.reference import pack_reference, unpack_reference

    rng, gen = random.Random(f"{order}{head_dim}{tokens}"), torch.Generator().manual_seed(3)
    heads, blocks = 4, 40
    inner = (tokens, heads, head_dim) if order == "NHD" else (heads, tokens, head_dim)
    shape = (blocks, 2, *inner) if kv_dim else (2, blocks, *inner)

    def cache():
        return [torch.randint(0, 256, (2 * blocks * tokens * heads * head_dim * 2,),
                              generator=gen, dtype=torch.uint8).view(torch.float16).view(shape)
                for _ in range(3)]

    src, a, b = cache(), cache(), cache()
    for t_a, t_b in zip(a, b):
        t_b.copy_(t_a)
    widths = set()
    for sel in (None, (1, 3), (0, 1), (2, 4)):
        ids = rng.sample(range(blocks), rng.randint(1, blocks))
        for layers in (None, [2, 0]):
            plan = make_plan(KVLayout.vllm(src, order, kv_dim), ids, layers, sel)
            for shift in (0, 2):  # an aligned and a 2-byte-aligned packed buffer
                ref = torch.full((plan.nbytes,), 0x5A, dtype=torch.uint8)
                got = torch.full((plan.nbytes + shift,), 0x5A, dtype=torch.uint8)
                pack_reference(plan, ref)
                widths.add(_emulate(emulator, plan, got[shift:], gather=True))
                assert torch.equal(got[shift:], ref), (sel, layers, shift)
            # scatter the same random chunk with the emulated kernel and the reference
            chunk = torch.randint(0, 256, (plan.nbytes,), generator=gen, dtype=torch.uint8)
            _emulate(emulator, make_plan(KVLayout.vllm(a, order, kv_dim), ids, layers, sel),
                     chunk, gather=False)
            unpack_reference(make_plan(KVLayout.vllm(b, order, kv_dim), ids, layers, sel), chunk)
            assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                       for x, y in zip(a, b)), (sel, layers)
    assert len(widths) >= 2, widths
