"""kvxfer.packing: the torch reference against a plain per-block copy, and the CUDA kernel
against the reference (GPU tests, skipped without a GPU and cupy).

The oracle never uses Region or the plan's byte arithmetic: it indexes the engine's own
tensors block by block (``tensors[layer][part][block]`` and friends) and slices heads
with ordinary tensor indexing, so a wrong offset in the packing code cannot cancel out.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from kvxfer.errors import BackendUnavailable, BlockOutOfRange, LayoutMismatch
from kvxfer.layout import KVLayout
from kvxfer.packing import pack, packed_nbytes, unpack
from kvxfer.packing import cuda as pcuda
from kvxfer.packing.pack_plan import make_plan
from kvxfer.packing.reference import pack_reference, unpack_reference

KINDS = ["vllm_nhd", "vllm_hnd", "vllm_nhd_kv1", "vllm_hnd_kv1", "split_kv", "mla"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]  # uint8 stands for fp8
LAYERS, BLOCKS, TOKENS, HEADS = 3, 11, 4, 4


def _random_bytes(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill t with random bytes (NaN bit patterns included: comparisons are bytewise)."""
    flat = t.view(torch.uint8).view(-1)
    flat.copy_(torch.randint(0, 256, flat.shape, generator=gen, dtype=torch.uint8))
    return t


class Cache:
    """Engine tensors of one layout kind, and the oracle's view of a block in them."""

    def __init__(self, kind: str, dtype: torch.dtype, head_dim: int = 8, seed: int = 0,
                 device: str = "cpu", blocks: int = BLOCKS, layers: int = LAYERS,
                 tokens: int = TOKENS) -> None:
        self.kind, self.gen, self.tokens = kind, torch.Generator().manual_seed(seed), tokens
        inner = (tokens, HEADS, head_dim) if "nhd" in kind else (HEADS, tokens, head_dim)
        if kind.startswith("vllm"):
            kv1 = kind.endswith("kv1")
            shape = (blocks, 2, *inner) if kv1 else (2, blocks, *inner)
            self.tensors = [self._new(shape, dtype) for _ in range(layers)]
        elif kind == "split_kv":
            shape = (blocks * tokens, HEADS, head_dim)
            self.tensors = [self._new(shape, dtype) for _ in range(2 * layers)]
        else:
            self.tensors = [self._new((blocks, tokens, head_dim), dtype) for _ in range(layers)]
        self.tensors = [t.to(device) for t in self.tensors]
        self.layout = self.make_layout()
        self.parts = 1 if kind == "mla" else 2

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return _random_bytes(torch.empty(shape, dtype=dtype), self.gen)

    def make_layout(self) -> KVLayout:
        k = self.kind
        if k.startswith("vllm"):
            return KVLayout.vllm(self.tensors, "NHD" if "nhd" in k else "HND",
                                 kv_dim=1 if k.endswith("kv1") else 0)
        if k == "split_kv":
            n = len(self.tensors) // 2
            return KVLayout.split_kv(self.tensors[:n], self.tensors[n:], block_size=self.tokens)
        return KVLayout.mla(self.tensors)

    def block(self, layer: int, part: int, b: int, heads=None) -> torch.Tensor:
        """The oracle: one block's selected elements, by plain tensor indexing."""
        k, t = self.kind, self.tensors
        if k == "mla":
            blk = t[layer][b]
        elif k == "split_kv":
            blk = t[part * (len(t) // 2) + layer][b * self.tokens:(b + 1) * self.tokens]
        else:
            blk = t[layer][b, part] if k.endswith("kv1") else t[layer][part, b]
        if heads is not None:
            blk = blk[:, heads[0]:heads[1]] if "nhd" in k or k == "split_kv" else \
                blk[heads[0]:heads[1]]
        return blk

    def oracle_pack(self, ids, layers=None, heads=None) -> torch.Tensor:
        layers = range(len(self.tensors) // (2 if self.kind == "split_kv" else 1)) \
            if layers is None else sorted(set(layers))
        pieces = [self.block(l, p, b, heads).contiguous().view(torch.uint8).reshape(-1).cpu()
                  for l in layers for p in range(self.parts) for b in ids]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors]


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8).cpu(), b.contiguous().view(torch.uint8).cpu())


def _ids(n: int, count: int, rng: random.Random) -> list[int]:
    return rng.sample(range(n), count)  # unsorted, non-contiguous, no repeats


def _heads_for(kind: str) -> list:
    return [None] if kind == "mla" else [None, (0, 1), (1, 3), (0, HEADS)]


# ---------------------------------------------------------------------- CPU reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_pack_matches_per_block_copy(kind, dtype):
    rng = random.Random(f"{kind}{dtype}")
    cache = Cache(kind, dtype, seed=rng.randrange(1 << 30))
    for heads in _heads_for(kind):
        for layers in (None, [2, 0], [1]):
            ids = _ids(BLOCKS, rng.randint(1, BLOCKS), rng)
            out = pack(cache.layout, ids, layers, heads=heads)
            assert out.dtype == torch.uint8 and out.is_contiguous()
            assert out.numel() == packed_nbytes(cache.layout, len(ids), layers, heads)
            assert torch.equal(out, cache.oracle_pack(ids, layers, heads)), (heads, layers, ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_into_poisoned_cache(kind, dtype):
    rng = random.Random(f"rt{kind}{dtype}")
    src = Cache(kind, dtype, seed=1)
    for heads in _heads_for(kind):
        dst = Cache(kind, dtype, seed=2)  # a different random cache: the poison
        before = dst.snapshot()
        src_ids, dst_ids = _ids(BLOCKS, 5, rng), _ids(BLOCKS, 5, rng)
        layers = [0, 2]
        unpack(dst.layout, dst_ids, layers, pack(src.layout, src_ids, layers, heads=heads),
               heads=heads)
        expect = Cache(kind, dtype)
        expect.tensors = before
        for l in layers:
            for p in range(src.parts):
                for s, d in zip(src_ids, dst_ids):
                    expect.block(l, p, d, heads).copy_(src.block(l, p, s, heads))
        for got, want in zip(dst.tensors, expect.tensors):
            assert _bytes_equal(got, want), heads


@pytest.mark.parametrize("dtype", [torch.float16, torch.uint8, torch.float32], ids=str)
def test_odd_block_bytes_head_dim_3(dtype):
    for kind in ("vllm_nhd", "vllm_hnd_kv1", "split_kv", "mla"):
        cache = Cache(kind, dtype, head_dim=3, seed=5, tokens=5)  # 3-, 6- or 12-byte heads
        for heads in _heads_for(kind):
            ids = [9, 2, 4]
            got = pack(cache.layout, ids, heads=heads)
            assert torch.equal(got, cache.oracle_pack(ids, None, heads))
            dst = Cache(kind, dtype, head_dim=3, seed=6, tokens=5)
            unpack(dst.layout, [0, 1, 10], None, got, heads=heads)
            assert torch.equal(pack(dst.layout, [0, 1, 10], heads=heads), got)


def test_unaligned_out_and_src():
    cache = Cache("vllm_hnd", torch.bfloat16)
    n = packed_nbytes(cache.layout, 3)
    buf = torch.full((n + 3,), 0x5A, dtype=torch.uint8)
    pack(cache.layout, [7, 0, 3], out=buf[3:])
    assert torch.equal(buf[3:], cache.oracle_pack([7, 0, 3])) and bool((buf[:3] == 0x5A).all())
    dst = Cache("vllm_hnd", torch.bfloat16, seed=4)
    unpack(dst.layout, [1, 2, 5], None, buf[3:])
    assert torch.equal(pack(dst.layout, [1, 2, 5]), buf[3:])


def test_ids_as_tensors_repeats_and_empty():
    cache = Cache("vllm_nhd", torch.float16)
    ids = [4, 4, 0, 10]  # pack may repeat a block
    for as_ids in (ids, torch.tensor(ids), torch.tensor(ids, dtype=torch.int32)):
        assert torch.equal(pack(cache.layout, as_ids), cache.oracle_pack(ids))
    empty = pack(cache.layout, [])
    assert empty.numel() == 0 == packed_nbytes(cache.layout, 0)
    unpack(cache.layout, [], None, empty)


def test_out_is_filled_and_returned_layers_in_ascending_order():
    cache = Cache("split_kv", torch.float32)
    n = packed_nbytes(cache.layout, 3, [2, 1])
    out = torch.full((n,), 0xA5, dtype=torch.uint8)
    assert pack(cache.layout, [1, 5, 3], [2, 1], out=out) is out
    assert torch.equal(out, cache.oracle_pack([1, 5, 3], [1, 2]))


def test_packed_nbytes_formula():
    cache = Cache("vllm_hnd", torch.bfloat16)
    lay = cache.layout
    assert packed_nbytes(lay, 7) == 7 * LAYERS * 2 * lay.block_bytes
    assert packed_nbytes(lay, 7, [1], heads=(1, 2)) == 7 * 2 * lay.block_bytes // HEADS
    with pytest.raises(ValueError):
        packed_nbytes(lay, -1)


# ------------------------------------------------------------------------ bad input
def _bad_calls(cache: Cache):
    lay, n = cache.layout, packed_nbytes(cache.layout, 2)
    good = torch.zeros(n, dtype=torch.uint8)
    yield BlockOutOfRange, lambda: pack(lay, [0, BLOCKS])
    yield BlockOutOfRange, lambda: pack(lay, torch.tensor([-1, 0]))
    yield BlockOutOfRange, lambda: pack(lay, [0, 1], layers=[LAYERS])
    yield BlockOutOfRange, lambda: unpack(lay, [1, BLOCKS + 5], None, good)
    yield LayoutMismatch, lambda: pack(lay, [0, 1], out=torch.zeros(n - 1, dtype=torch.uint8))
    yield LayoutMismatch, lambda: pack(lay, [0, 1], out=torch.zeros(n // 2, dtype=torch.int16))
    yield LayoutMismatch, lambda: pack(lay, [0, 1], out=torch.zeros(2, n, dtype=torch.uint8)[:, 0])
    yield LayoutMismatch, lambda: pack(lay, [0, 1], out=[0] * n)
    yield LayoutMismatch, lambda: unpack(lay, [0, 1], None, torch.zeros(n + 1, dtype=torch.uint8))
    yield LayoutMismatch, lambda: pack(lay, [0], heads=(2, 2))
    yield LayoutMismatch, lambda: pack(lay, [0], heads=(0, HEADS + 1))
    yield LayoutMismatch, lambda: pack(lay, [0], heads=(-1, 1))
    yield LayoutMismatch, lambda: pack(lay, [0], heads=3)
    yield ValueError, lambda: unpack(lay, [1, 1], None, good)
    yield ValueError, lambda: pack(lay, [0.5])
    yield ValueError, lambda: pack(lay, torch.tensor([0.0, 1.0]))
    yield ValueError, lambda: pack(lay, torch.tensor([[0, 1]]))


def test_bad_input_is_refused_before_any_byte_is_written():
    cache = Cache("vllm_nhd", torch.bfloat16)
    before = cache.snapshot()
    n = 0
    for exc, call in _bad_calls(cache):
        with pytest.raises(exc):
            call()
        n += 1
    assert n == 17
    assert all(_bytes_equal(a, b) for a, b in zip(cache.tensors, before))
    out = torch.full((packed_nbytes(cache.layout, 3),), 7, dtype=torch.uint8)
    with pytest.raises(BlockOutOfRange):
        pack(cache.layout, [0, 1, BLOCKS], out=out)  # bad id last: nothing written first
    assert bool((out == 7).all())


def test_heads_refused_for_mla():
    cache = Cache("mla", torch.bfloat16)
    with pytest.raises(LayoutMismatch, match="MLA"):
        pack(cache.layout, [0], heads=(0, 1))
    with pytest.raises(LayoutMismatch, match="MLA"):
        packed_nbytes(cache.layout, 1, heads=(0, 1))


# -------------------------------------------------- CUDA path pieces that need no GPU
def test_import_does_not_import_cupy():
    code = "import sys, kvxfer.packing; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_source_is_the_packaged_file_and_csrc_matches():
    from pathlib import Path
    src = pcuda.kernel_source()
    assert "KV_DEFINE(16)" in src and "#include" not in src  # NVRTC: no headers
    top = Path(__file__).resolve().parents[1] / "csrc" / "kv_pack.cu"
    assert top.read_text() == src


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU guard")
def test_kernel_unavailable_without_gpu_names_the_extra():
    assert not pcuda.available()
    with pytest.raises(BackendUnavailable) as info:
        pcuda._cupy()
    assert info.value.extra == "cuda"


def test_access_width_and_launch_config():
    cache = Cache("vllm_nhd", torch.float16, head_dim=8)  # 16-byte heads
    lay = cache.layout
    plan = make_plan(lay, [1, 2], None, None)
    aligned = lay.region(0, "K").base  # torch CPU allocations are 64-byte aligned
    assert pcuda.access_width(plan, aligned) == 16
    assert pcuda.access_width(plan, aligned + 2) == 2
    assert pcuda.access_width(make_plan(lay, [1], None, (1, 2)), aligned) == 16
    odd = Cache("vllm_nhd", torch.float16, head_dim=3, tokens=5).layout
    assert pcuda.access_width(make_plan(odd, [1], None, (1, 2)), aligned) == 2
    assert pcuda.access_width(make_plan(odd, [1], None, (2, 4)), aligned) == 4
    assert pcuda.access_width(make_plan(odd, [1], None, None), aligned) == 8
    grid, threads = pcuda.launch_config(plan, 16, num_sms=132)
    rows = LAYERS * 2 * 2  # regions x ids, one segment each
    words = lay.block_bytes // 16  # 32 words -> 32 threads per row, 8 rows per CTA
    assert threads == pcuda.THREADS and grid == -(-rows // (pcuda.THREADS // words))
    big = make_plan(lay, list(range(BLOCKS)) * 400, None, None)
    assert pcuda.launch_config(big, 16, num_sms=4)[0] == 4 * pcuda.CTAS_PER_SM


# ----------------------------------------------------------------------- GPU tests
gpu = pytest.mark.skipif(not pcuda.available(),
                         reason="needs a CUDA GPU and cupy (pip install 'kvxfer[cuda]')")


def _poisoned(n: int, device) -> torch.Tensor:
    return torch.full((n,), 0x5A, dtype=torch.uint8, device=device)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim,dtype", [(128, torch.bfloat16), (3, torch.float16),
                                            (8, torch.float32), (64, torch.uint8)], ids=str)
@pytest.mark.parametrize("blocks", [1, 37, 300])
def test_gpu_kernel_matches_reference(kind, head_dim, dtype, blocks):
    rng = random.Random(f"gpu{kind}{head_dim}{blocks}")
    geo = dict(head_dim=head_dim, device="cuda", blocks=blocks + 3, layers=4,
               tokens=5 if head_dim == 3 else 16)  # head_dim 3: 120-byte blocks
    cache = Cache(kind, dtype, seed=rng.randrange(1 << 30), **geo)
    a, b = Cache(kind, dtype, seed=9, **geo), Cache(kind, dtype, seed=9, **geo)  # equal poison
    for heads in _heads_for(kind):
        for layers in (None, [3, 1]):
            ids = _ids(blocks + 3, blocks, rng)
            plan = make_plan(cache.layout, ids, layers, heads)
            ref = _poisoned(plan.nbytes, "cuda")
            pack_reference(plan, ref)
            for dev in ("cuda", "pinned"):
                out = _poisoned(plan.nbytes, "cpu").pin_memory() if dev == "pinned" else \
                    _poisoned(plan.nbytes, "cuda")
                pack(cache.layout, ids, layers, out=out, heads=heads)
                torch.cuda.synchronize()
                assert torch.equal(out.cpu(), ref.cpu()), (dev, heads, layers)
            assert torch.equal(ref.cpu(), cache.oracle_pack(ids, layers, heads))
            # scatter: kernel into a, reference into b (equal so far), then compare
            src = _random_bytes(torch.empty(plan.nbytes, dtype=torch.uint8), cache.gen)
            unpack(a.layout, ids, layers, src.cuda(), heads=heads)
            unpack_reference(make_plan(b.layout, ids, layers, heads), src.cuda())
            torch.cuda.synchronize()
            assert all(_bytes_equal(x, y) for x, y in zip(a.tensors, b.tensors))
            unpack(b.layout, ids, layers, src.pin_memory(), heads=heads)  # pinned source
            torch.cuda.synchronize()
            assert all(_bytes_equal(x, y) for x, y in zip(a.tensors, b.tensors))


@pytest.mark.gpu
@gpu
def test_gpu_misaligned_out_and_pageable_host_refused():
    cache = Cache("vllm_nhd", torch.bfloat16, head_dim=128, device="cuda", blocks=64)
    ids = list(range(63, 0, -2))
    n = packed_nbytes(cache.layout, len(ids))
    buf = _poisoned(n + 1, "cuda")
    pack(cache.layout, ids, out=buf[1:])  # 1-byte aligned: the narrowest kernel
    assert torch.equal(buf[1:].cpu(), cache.oracle_pack(ids)) and int(buf[0]) == 0x5A
    with pytest.raises(LayoutMismatch, match="pinned"):
        pack(cache.layout, ids, out=torch.zeros(n, dtype=torch.uint8))
