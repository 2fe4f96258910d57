"""KVLayout: a view of an engine's paged KV tensors as byte regions.

An engine keeps its KV cache as one or more tensors per layer. Whatever their shape,
the memory of one (layer, part) is a sequence of equally sized blocks::

    region (layer l, part K)
    base                base + stride          base + 2*stride
    |<- block_bytes ->|  |<- block_bytes ->|   |<- block_bytes ->|
    [ block 0         ]..[ block 1         ]...[ block 2         ] ...

``block_bytes`` are contiguous; ``block_stride`` may be larger (FlashInfer keeps K and V
of a block side by side, so each part's stride is twice its block). A block id names
the same slot in every region. Parts are ``("K", "V")`` for attention with separate keys
and values and ``("L",)`` for MLA's one latent vector per token.

The layout never copies or owns engine memory: regions are views. Peers compare
:class:`LayoutDescriptor`s (what a block's bytes mean), never tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Sequence

import torch

from .errors import BlockOutOfRange, LayoutMismatch
from .heads import exchange_heads, shard_heads

KV_PARTS = ("K", "V")
MLA_PARTS = ("L",)

# Descriptor fields two peers must agree on (the model's geometry) to exchange KV. Their
# tensor-parallel shards may differ: they exchange the heads both hold (kvxfer.heads).
_COMPARED = ("block_order", "dtype", "num_layers", "parts", "block_size", "total_kv_heads",
             "head_dim")


@dataclass(frozen=True, slots=True)
class Region:
    """The blocks of one (layer, part): ``num_blocks`` slots of ``block_bytes`` bytes."""

    layer: int
    part: str
    view: torch.Tensor  # [num_blocks, ...] view of engine memory; a block is contiguous
    block_stride: int  # bytes from one block's start to the next block's
    block_bytes: int  # bytes of one block
    num_blocks: int

    @property
    def base(self) -> int:
        """Address of block 0 (a device pointer for CUDA tensors)."""
        return self.view.data_ptr()


@dataclass(frozen=True, slots=True)
class LayoutDescriptor:
    """What peers exchange to check that their blocks mean the same bytes.

    ``num_blocks`` and ``device`` may differ between peers, and so may the shard
    (``head_start``, ``num_kv_heads``) as long as the peers share a head; every other
    field must match.
    """

    block_order: str  # "NHD" (token-major), "HND" (head-major) or "MLA"
    dtype: str  # torch dtype name, e.g. "bfloat16"
    num_layers: int
    parts: tuple[str, ...]
    block_size: int  # tokens per block
    num_kv_heads: int  # KV heads held by this side (1 for MLA)
    head_dim: int  # elements per head (latent_dim for MLA)
    block_bytes: int  # bytes of one block of one (layer, part)
    num_blocks: int
    device: str  # "cpu" or "cuda"
    total_kv_heads: int  # KV heads of the model (1 for MLA)
    head_start: int  # first global KV head this side holds (its tensor-parallel shard)

    def check_compatible(self, other: "LayoutDescriptor") -> None:
        """Raise LayoutMismatch naming the first field on which the peers differ, or
        ``heads`` when their tensor-parallel shards share no KV head."""
        for name in _COMPARED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise LayoutMismatch(
                    f"KV layouts differ in {name}: local {mine!r}, peer {theirs!r}", field=name)
        # Bytes of one head's share of a block (the whole block for equal shards).
        if self.block_bytes * other.num_kv_heads != other.block_bytes * self.num_kv_heads:
            raise LayoutMismatch(
                f"KV layouts differ in block_bytes: local {self.block_bytes} for "
                f"{self.num_kv_heads} heads, peer {other.block_bytes} for {other.num_kv_heads}",
                field="block_bytes")
        exchange_heads(self, other)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LayoutDescriptor":
        """Decode a peer's descriptor; malformed input raises LayoutMismatch."""
        try:
            raw = json.loads(bytes(data).decode())
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            kwargs = {f.name: raw[f.name] for f in fields(cls)}
            kwargs["parts"] = tuple(kwargs["parts"])
            desc = cls(**kwargs)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            raise LayoutMismatch(f"malformed layout descriptor: {exc}", field="descriptor") from exc
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "block_bytes",
                     "num_blocks", "total_kv_heads", "head_start"):
            value = getattr(desc, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LayoutMismatch(f"malformed layout descriptor: {name}={value!r}", field=name)
        if not 0 < desc.num_kv_heads <= desc.total_kv_heads - desc.head_start:
            raise LayoutMismatch(f"malformed layout descriptor: heads [{desc.head_start}, "
                                 f"{desc.head_start + desc.num_kv_heads}) of "
                                 f"{desc.total_kv_heads}", field="head_start")
        if desc.block_size <= 0 or desc.block_bytes % (desc.block_size * desc.num_kv_heads):
            raise LayoutMismatch(f"malformed layout descriptor: {desc.block_bytes} bytes are "
                                 f"not {desc.block_size} tokens of {desc.num_kv_heads} heads",
                                 field="block_bytes")
        return desc


class KVLayout:
    """Block-addressable view of an engine's paged KV cache.

    Build one with a constructor that matches the engine (:meth:`vllm`,
    :meth:`split_kv`, :meth:`mla`); they infer geometry from the tensors and refuse
    tensors they cannot address with a :class:`LayoutMismatch` naming the problem.
    """

    def __init__(self, regions: Sequence[Region], *, block_order: str, parts: tuple[str, ...],
                 block_size: int, num_kv_heads: int, head_dim: int, head_start: int = 0,
                 total_kv_heads: int | None = None) -> None:
        if not regions:
            raise LayoutMismatch("a KV layout needs at least one layer", field="num_layers")
        first = regions[0].view
        self.regions: tuple[Region, ...] = tuple(regions)
        self.parts = parts
        self.num_layers = len(regions) // len(parts)
        self.num_blocks = regions[0].num_blocks
        self.block_bytes = regions[0].block_bytes
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.descriptor = LayoutDescriptor(
            block_order=block_order, dtype=str(first.dtype).removeprefix("torch."),
            num_layers=self.num_layers, parts=parts, block_size=block_size,
            num_kv_heads=num_kv_heads, head_dim=head_dim, block_bytes=self.block_bytes,
            num_blocks=self.num_blocks, device=first.device.type,
            total_kv_heads=num_kv_heads if total_kv_heads is None else total_kv_heads,
            head_start=head_start)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def vllm(cls, tensors: Sequence[torch.Tensor], kv_layout: str = "NHD",
             kv_dim: int = 0, *, tp_rank: int = 0, tp_size: int = 1,
             total_kv_heads: int | None = None) -> "KVLayout":
        """vLLM's paged KV cache: one tensor per layer.

        Args:
            tensors: per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
                for ``kv_layout="NHD"`` or ``[2, num_blocks, num_kv_heads, block_size,
                head_dim]`` for ``"HND"``. With ``kv_dim=1`` the K/V axis comes second
                (``[num_blocks, 2, ...]``, FlashInfer's order).
            kv_layout: "NHD" or "HND".
            kv_dim: where the size-2 K/V axis is, 0 or 1.
            tp_rank, tp_size: this worker's tensor-parallel rank and size; the tensors
                hold that rank's shard of the KV heads (see :func:`kvxfer.heads.shard_heads`).
            total_kv_heads: the model's KV heads; needed when ``tp_size > 1``.

        Raises:
            LayoutMismatch: on a wrong rank, shape, dtype, device or stride, or a head
                count that is not the shard of ``tp_rank`` (names the field).
        """
        if kv_layout not in ("NHD", "HND"):
            raise LayoutMismatch(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}",
                                 field="kv_layout")
        if kv_dim not in (0, 1):
            raise LayoutMismatch(f"kv_dim must be 0 or 1, got {kv_dim!r}", field="kv_dim")
        tensors = _check_tensors(tensors, ndim=5, what="vLLM KV tensor")
        shape = tuple(tensors[0].shape)
        if shape[kv_dim] != 2:
            raise LayoutMismatch(
                f"vLLM KV tensors need size 2 (K, V) on dim {kv_dim}, got shape {shape}",
                field="shape")
        inner = shape[2:]
        if kv_layout == "NHD":
            block_size, heads, head_dim = inner
        else:
            heads, block_size, head_dim = inner
        regions = []
        for layer, t in enumerate(tensors):
            for p, part in enumerate(KV_PARTS):
                regions.append(_region(layer, part, t.select(kv_dim, p)))
        return cls(regions, block_order=kv_layout, parts=KV_PARTS, block_size=block_size,
                   num_kv_heads=heads, head_dim=head_dim,
                   **_shard(heads, tp_rank, tp_size, total_kv_heads))

    @classmethod
    def split_kv(cls, k_tensors: Sequence[torch.Tensor], v_tensors: Sequence[torch.Tensor],
                 block_size: int, *, tp_rank: int = 0, tp_size: int = 1,
                 total_kv_heads: int | None = None) -> "KVLayout":
        """Separate K and V tensors per layer, as SGLang's token pool keeps them.

        Args:
            k_tensors, v_tensors: per layer, ``[num_blocks * block_size, num_kv_heads,
                head_dim]``; a block is ``block_size`` consecutive token slots.
            block_size: tokens per block (SGLang's page size).
            tp_rank, tp_size, total_kv_heads: the tensor-parallel shard, as for :meth:`vllm`.

        Raises:
            LayoutMismatch: on unequal K/V lists, shapes not divisible by block_size, a
                wrong rank, dtype, device or stride, or a head count that is not the
                shard of ``tp_rank``.
        """
        if not isinstance(block_size, int) or block_size <= 0:
            raise LayoutMismatch(f"block_size must be a positive int, got {block_size!r}",
                                 field="block_size")
        if len(k_tensors) != len(v_tensors):
            raise LayoutMismatch(
                f"{len(k_tensors)} K tensors but {len(v_tensors)} V tensors", field="num_layers")
        tensors = _check_tensors(list(k_tensors) + list(v_tensors), ndim=3,
                                 what="SGLang K/V buffer")
        slots, heads, head_dim = tensors[0].shape
        if slots % block_size:
            raise LayoutMismatch(
                f"{slots} token slots are not a whole number of {block_size}-token blocks",
                field="block_size")
        n = len(k_tensors)
        regions = []
        for layer in range(n):
            for part, t in zip(KV_PARTS, (tensors[layer], tensors[n + layer])):
                regions.append(_region(layer, part, t.unflatten(0, (slots // block_size, block_size))))
        return cls(regions, block_order="NHD", parts=KV_PARTS, block_size=block_size,
                   num_kv_heads=heads, head_dim=head_dim,
                   **_shard(heads, tp_rank, tp_size, total_kv_heads))

    @classmethod
    def mla(cls, tensors: Sequence[torch.Tensor]) -> "KVLayout":
        """Multi-head latent attention (DeepSeek): one latent tensor per layer.

        Every tensor-parallel rank holds the whole latent, so any rank may serve any
        other whatever the two sides' TP sizes: there is no shard to give.

        Args:
            tensors: per layer, ``[num_blocks, block_size, latent_dim]``.

        Raises:
            LayoutMismatch: on a wrong rank, dtype, device or stride.
        """
        tensors = _check_tensors(tensors, ndim=3, what="MLA latent tensor")
        _, block_size, latent_dim = tensors[0].shape
        regions = [_region(layer, "L", t) for layer, t in enumerate(tensors)]
        return cls(regions, block_order="MLA", parts=MLA_PARTS, block_size=block_size,
                   num_kv_heads=1, head_dim=latent_dim)

    # ------------------------------------------------------------------- queries
    def region(self, layer: int, part: str) -> Region:
        return self.regions[layer * len(self.parts) + self.parts.index(part)]

    def layer_regions(self, layer: int) -> tuple[Region, ...]:
        n = len(self.parts)
        return self.regions[layer * n:(layer + 1) * n]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block id across every layer and part."""
        return self.block_bytes * len(self.regions)

    def check_blocks(self, block_ids: Iterable[int]) -> None:
        """Raise BlockOutOfRange unless every id is in [0, num_blocks)."""
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise BlockOutOfRange(f"block id {b} outside [0, {self.num_blocks})")

    def normalize_layers(self, layers: Iterable[int] | None) -> tuple[int, ...]:
        """Sorted, unique layer indices (all layers for None); range-checked."""
        if layers is None:
            return tuple(range(self.num_layers))
        out = sorted(set(int(x) for x in layers))
        for x in out:
            if not 0 <= x < self.num_layers:
                raise BlockOutOfRange(f"layer {x} outside [0, {self.num_layers})")
        return tuple(out)

    def __repr__(self) -> str:
        d = self.descriptor
        return (f"KVLayout({d.block_order}, {d.dtype}, layers={d.num_layers}, "
                f"blocks={d.num_blocks}x{d.block_size} tokens, heads={d.num_kv_heads}x"
                f"{d.head_dim} (from {d.head_start} of {d.total_kv_heads}), {d.device})")


def _shard(heads: int, tp_rank: int, tp_size: int,
           total_kv_heads: int | None) -> dict[str, int]:
    """``head_start`` and ``total_kv_heads`` of a layout whose tensors hold ``heads``."""
    if total_kv_heads is None:
        if tp_size != 1 or tp_rank != 0:
            raise LayoutMismatch("a tensor-parallel shard (tp_size > 1) needs the model's "
                                 "total_kv_heads", field="total_kv_heads")
        total_kv_heads = heads
    shard = shard_heads(tp_rank, tp_size, total_kv_heads)
    if shard.count != heads:
        raise LayoutMismatch(f"rank {tp_rank} of tp_size {tp_size} holds {shard.count} of "
                             f"{total_kv_heads} KV heads, but the tensors hold {heads}",
                             field="num_kv_heads")
    return {"head_start": shard.first, "total_kv_heads": total_kv_heads}


def _check_tensors(tensors: Sequence[torch.Tensor], ndim: int, what: str) -> list[torch.Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise LayoutMismatch(f"no {what}s given", field="num_layers")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise LayoutMismatch(f"{what} {i} is a {type(t).__name__}, not a torch.Tensor",
                                 field="type")
        if t.dim() != ndim:
            raise LayoutMismatch(f"{what} {i} has {t.dim()} dims, expected {ndim} "
                                 f"(shape {tuple(t.shape)})", field="shape")
        if t.device != first.device:
            raise LayoutMismatch(f"{what}s are on mixed devices: {first.device} and {t.device}",
                                 field="device")
        if t.dtype != first.dtype:
            raise LayoutMismatch(f"{what}s have mixed dtypes: {first.dtype} and {t.dtype}",
                                 field="dtype")
        if t.shape != first.shape:
            raise LayoutMismatch(f"{what}s have different shapes: {tuple(first.shape)} and "
                                 f"{tuple(t.shape)}", field="shape")
        if t.device.type not in ("cpu", "cuda"):
            raise LayoutMismatch(f"{what} {i} is on {t.device}; kvxfer handles cpu and cuda",
                                 field="device")
        if t.numel() == 0:
            raise LayoutMismatch(f"{what} {i} is empty (shape {tuple(t.shape)})", field="shape")
    return tensors


def _region(layer: int, part: str, view: torch.Tensor) -> Region:
    """Region of a [num_blocks, ...] view whose per-block elements must be contiguous."""
    elem = view.element_size()
    expected = 1
    for size, stride in reversed(list(zip(view.shape[1:], view.stride()[1:]))):
        if size != 1 and stride != expected:
            raise LayoutMismatch(
                f"layer {layer} {part}: a block's elements are not contiguous "
                f"(shape {tuple(view.shape)}, strides {view.stride()})", field="stride")
        expected *= size
    block_bytes = expected * elem
    block_stride = view.stride(0) * elem
    if view.shape[0] > 1 and block_stride < block_bytes:
        raise LayoutMismatch(f"layer {layer} {part}: blocks overlap (stride {block_stride} B "
                             f"< block {block_bytes} B)", field="stride")
    return Region(layer=layer, part=part, view=view, block_stride=block_stride,
                  block_bytes=block_bytes, num_blocks=view.shape[0])
