"""Chained block hashes: vLLM's ``sha256_cbor`` scheme and a fast xxh3-128 scheme.

Theory of operation
-------------------
A request's tokens are cut into full blocks of ``block_size`` tokens (a partial last
block is not hashed). Each block's digest chains on its parent's digest::

    root ──► H(root, tokens[0:B], extra_0) = d0 ──► H(d0, tokens[B:2B], extra_1) = d1 ──► ...

``mode="vllm"``: ``H`` is SHA-256 over the canonical CBOR encoding of the triple
``(parent_digest, tuple(token_ids), extra_keys or None)`` and ``root`` is NONE_HASH =
SHA-256(CBOR(seed)), seed ``"vllm-none-hash"`` unless vLLM runs with PYTHONHASHSEED.
Extra keys, in vLLM's order: LoRA, multimodal items overlapping the block, cache salt
(first block only). Their shape is the ``key_scheme``:

    "tagged"    vLLM >= 0.31: ("lora", name, path), ("mm", identifier, offset in
                block), ("cache_salt", salt)  -- the default (today's vLLM)
    "untagged"  vLLM <= 0.30: name, (identifier, offset in block), salt

(vLLM's KV events publish the untagged forms in ``BlockStored.extra_keys`` whatever it
hashes.) The CBOR encoder below covers exactly the types
that appear in that triple (bytes, str, int, None, tuples), written to RFC 8949's
canonical rules (shortest head), so the package needs no cbor2 at run time.

``mode="fast"``: ``H`` is xxh3-128 over ``parent(16 B) | tokens as little-endian int64 |
encoded extra keys``; the root derives from the optional seed, so digests are stable
across processes and machines without any environment variable.

The 64-bit form that vLLM's KV events carry is the digest's last 8 bytes, big-endian
(``int.from_bytes(digest, "big") & (2**64 - 1)``); :func:`event_hash` computes it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvxfer.errors import BackendUnavailable

#: Seed vLLM derives NONE_HASH from when PYTHONHASHSEED is unset (cryptographic hashes).
VLLM_DEFAULT_SEED = "vllm-none-hash"

_MASK64 = (1 << 64) - 1
_FAST_ROOT_TAG = b"kvxfer-fast-root\x00"

#: One multimodal item: (identifier, offset in request tokens, length in tokens).
MMFeature = tuple[str, int, int]

#: Extra-key schemes, by the vLLM releases that hash that way.
KEY_SCHEMES: tuple[str, ...] = ("tagged", "untagged")
_FIRST_TAGGED = (0, 31)


def key_scheme_for(vllm_version: str) -> str:
    """The extra-key scheme a vLLM release hashes with.

    Args:
        vllm_version: e.g. ``"0.33.0"`` or ``vllm.__version__``.

    Returns:
        ``"tagged"`` for 0.31 and later, ``"untagged"`` before.

    Raises:
        ValueError: not a version string.
    """
    try:
        major, minor = (int(p) for p in vllm_version.split(".")[:2])
    except ValueError:
        raise ValueError(f"not a vLLM version: {vllm_version!r}") from None
    return "tagged" if (major, minor) >= _FIRST_TAGGED else "untagged"


def event_hash(digest: bytes | int) -> int:
    """The 64-bit block hash vLLM's KV events carry for ``digest``.

    Args:
        digest: a block digest (bytes), or an int already in event form.

    Returns:
        The digest's last 8 bytes as an unsigned big-endian integer.
    """
    if isinstance(digest, int):
        return digest & _MASK64
    return int.from_bytes(digest, "big") & _MASK64


# ---------------------------------------------------------------- canonical CBOR


def _cbor_head(out: bytearray, major: int, value: int) -> None:
    top = major << 5
    if value < 24:
        out.append(top | value)
    elif value < 0x100:
        out += struct.pack(">BB", top | 24, value)
    elif value < 0x10000:
        out += struct.pack(">BH", top | 25, value)
    elif value < 0x100000000:
        out += struct.pack(">BI", top | 26, value)
    elif value <= _MASK64:
        out += struct.pack(">BQ", top | 27, value)
    else:
        raise ValueError(f"integer {value} does not fit a CBOR head")


def _cbor(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(0xF6)
    elif isinstance(value, bool):
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _cbor_head(out, 0, value)
        else:
            _cbor_head(out, 1, -1 - value)
    elif isinstance(value, (bytes, bytearray)):
        _cbor_head(out, 2, len(value))
        out += value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _cbor_head(out, 3, len(raw))
        out += raw
    elif isinstance(value, (tuple, list)):
        _cbor_head(out, 4, len(value))
        for item in value:
            _cbor(out, item)
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} in a block key")


def sha256_cbor(value: Any) -> bytes:
    """SHA-256 of the canonical CBOR encoding of ``value`` (vLLM's ``sha256_cbor``).

    Args:
        value: None, bool, int, bytes, str, or tuples/lists of those.

    Returns:
        The 32-byte digest.

    Raises:
        TypeError: a value of another type.
    """
    out = bytearray()
    _cbor(out, value)
    return hashlib.sha256(out).digest()


# ---------------------------------------------------------------- extra keys


def block_extra_keys(start: int, end: int, lora_name: str | None, cache_salt: str | None,
                     mm_features: Sequence[MMFeature], lora_path: str | None = None,
                     scheme: str = "tagged") -> tuple[Any, ...] | None:
    """Extra keys of the block covering tokens ``[start, end)``, in vLLM's order.

    Args:
        start: index of the block's first token in the request.
        end: one past the block's last token.
        lora_name: the LoRA adapter's name, on every block.
        cache_salt: the request's cache salt, on the first block only.
        mm_features: multimodal items ``(identifier, offset, length)`` sorted by offset;
            each item overlapping the block adds its identifier and ``offset - start``.
        lora_path: the adapter's path (tagged scheme only; vLLM requires one).
        scheme: ``"tagged"`` or ``"untagged"`` (see :data:`KEY_SCHEMES`).

    Returns:
        The tuple of extra keys, or None when there are none.

    Raises:
        ValueError: an unknown scheme, or a LoRA name without a path when tagged.
    """
    tagged = _check_scheme(scheme)
    keys: list[Any] = []
    if lora_name is not None:
        if tagged:
            if not lora_path:
                raise ValueError("vLLM >= 0.31 hashes the LoRA adapter's path with its name: "
                                 "pass lora_path (or key_scheme='untagged' for older vLLM)")
            keys.append(("lora", lora_name, lora_path))
        else:
            keys.append(lora_name)
    for identifier, offset, length in mm_features:
        if offset < end and start < offset + length:
            keys.append(("mm", identifier, offset - start) if tagged
                        else (identifier, offset - start))
    if start == 0 and cache_salt:
        keys.append(("cache_salt", cache_salt) if tagged else cache_salt)
    return tuple(keys) if keys else None


def _check_scheme(scheme: str) -> bool:
    if scheme not in KEY_SCHEMES:
        raise ValueError(f"key_scheme must be one of {KEY_SCHEMES}, got {scheme!r}")
    return scheme == "tagged"


def _fast_extra(out: bytearray, value: Any) -> None:
    # Length-prefixed, type-tagged: no two distinct values share an encoding.
    if value is None:
        out += b"n"
    elif isinstance(value, int):
        out += b"i" + (value & _MASK64).to_bytes(8, "little") + (b"-" if value < 0 else b"+")
    elif isinstance(value, (bytes, str)):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        out += (b"s" if isinstance(value, str) else b"b") + struct.pack("<I", len(raw)) + raw
    elif isinstance(value, (tuple, list)):
        out += b"t" + struct.pack("<I", len(value))
        for item in value:
            _fast_extra(out, item)
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} in a block key")


# ---------------------------------------------------------------- hasher


@dataclass(slots=True)
class PrefixHashState:
    """A request's hashes so far; :meth:`extend` hashes only the new full blocks.

    Made by :meth:`BlockHasher.start`; owned by the caller (not thread-safe).
    """

    # The hasher that owns the scheme; set once.
    hasher: BlockHasher
    # LoRA name, cache salt, multimodal items, LoRA path: fixed for the request.
    lora_name: str | None
    cache_salt: str | None
    mm_features: tuple[MMFeature, ...]
    lora_path: str | None = None
    # Digests of every full block so far; extend() appends.
    hashes: list[bytes] = field(default_factory=list)
    # Tokens after the last full block (fewer than block_size); extend() rewrites.
    pending: list[int] = field(default_factory=list)

    def extend(self, token_ids: Sequence[int]) -> list[bytes]:
        """Append tokens; hash the blocks they complete.

        Args:
            token_ids: the request's next tokens.

        Returns:
            Digests of the blocks completed by these tokens (possibly empty).
        """
        tokens = self.pending + list(token_ids)
        size = self.hasher.block_size
        full = len(tokens) // size * size
        start = len(self.hashes) * size
        parent = self.hashes[-1] if self.hashes else None
        new = self.hasher._chain(tokens[:full], start, parent, self.lora_name,
                                 self.cache_salt, self.mm_features, self.lora_path)
        self.hashes.extend(new)
        self.pending = tokens[full:]
        return new


class BlockHasher:
    """Chained per-block digests, in vLLM's ``sha256_cbor`` scheme or a fast one.

    Args:
        block_size: tokens per block (> 0).
        mode: ``"fast"`` (xxh3-128, 16-byte digests) or ``"vllm"`` (sha256_cbor,
            32-byte digests).
        seed: root seed. vllm mode: the PYTHONHASHSEED string vLLM runs with, else
            None for vLLM's default ``"vllm-none-hash"``. fast mode: any string, or
            None for the fixed default root.
        key_scheme: how extra keys (LoRA, multimodal, salt) are shaped: ``"tagged"``
            (vLLM >= 0.31, the default) or ``"untagged"`` (older vLLM); see
            :func:`key_scheme_for` and :meth:`for_vllm`.

    Raises:
        ValueError: a non-positive block size, an unknown mode or key scheme.
        BackendUnavailable: fast mode without the xxhash package.
    """

    __slots__ = ("block_size", "mode", "seed", "key_scheme", "root", "_xxh")

    def __init__(self, block_size: int, mode: str = "fast", seed: str | None = None,
                 key_scheme: str = "tagged") -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if mode not in ("fast", "vllm"):
            raise ValueError(f"mode must be 'fast' or 'vllm', got {mode!r}")
        _check_scheme(key_scheme)
        self.block_size = block_size
        self.mode = mode
        self.seed = seed
        self.key_scheme = key_scheme
        self._xxh: Any = None
        if mode == "vllm":
            self.root = sha256_cbor(VLLM_DEFAULT_SEED if seed is None else seed)
        else:
            try:
                import xxhash
            except ImportError as exc:  # pragma: no cover - xxhash is in the extra
                raise BackendUnavailable("prefix-fast-hash", str(exc), extra="prefix") from exc
            self._xxh = xxhash.xxh3_128_digest
            self.root = self._xxh(_FAST_ROOT_TAG + (seed or "").encode("utf-8"))

    @classmethod
    def for_vllm(cls, block_size: int, vllm_version: str,
                 seed: str | None = None) -> BlockHasher:
        """A ``mode="vllm"`` hasher with the key scheme of one vLLM release.

        Args:
            block_size: vLLM's block size (its hash block size).
            vllm_version: the release, e.g. ``"0.33.0"``.
            seed: PYTHONHASHSEED of the engine, if set.

        Raises:
            ValueError: a bad block size or version.
        """
        return cls(block_size, "vllm", seed, key_scheme_for(vllm_version))

    def start(self, lora_name: str | None = None, cache_salt: str | None = None,
              mm_features: Sequence[MMFeature] = (),
              lora_path: str | None = None) -> PrefixHashState:
        """Begin an incremental hash of one request.

        Args:
            lora_name: LoRA adapter name (an extra key on every block).
            cache_salt: cache salt (an extra key on the first block).
            mm_features: multimodal items ``(identifier, offset, length)``.
            lora_path: the LoRA adapter's path (hashed by the tagged scheme).

        Returns:
            A state whose ``extend(tokens)`` hashes only the new full blocks.

        Raises:
            ValueError: a LoRA name without a path under the tagged scheme.
        """
        block_extra_keys(0, 0, lora_name, None, (), lora_path, self.key_scheme)  # check now
        return PrefixHashState(self, lora_name, cache_salt, tuple(mm_features), lora_path)

    def hash_blocks(self, token_ids: Sequence[int], lora_name: str | None = None,
                    cache_salt: str | None = None, mm_keys: Sequence[MMFeature] = (),
                    lora_path: str | None = None) -> list[bytes]:
        """Digests of every full block of ``token_ids``.

        Args:
            token_ids: the request's tokens.
            lora_name: LoRA adapter name.
            cache_salt: cache salt.
            mm_keys: multimodal items ``(identifier, offset, length)``.
            lora_path: the LoRA adapter's path (vLLM's ``LoRARequest.lora_path``);
                needed with ``lora_name`` under the tagged scheme.

        Returns:
            One digest per full block, in order.

        Raises:
            ValueError: a LoRA name without a path under the tagged scheme.
        """
        tokens = list(token_ids)
        full = len(tokens) // self.block_size * self.block_size
        block_extra_keys(0, 0, lora_name, None, (), lora_path, self.key_scheme)
        return self._chain(tokens[:full], 0, None, lora_name, cache_salt, tuple(mm_keys),
                           lora_path)

    def _chain(self, tokens: list[int], start: int, parent: bytes | None,
               lora_name: str | None, cache_salt: str | None,
               mm: tuple[MMFeature, ...], lora_path: str | None = None) -> list[bytes]:
        size = self.block_size
        digest = self.root if parent is None else parent
        out: list[bytes] = []
        fast = self.mode == "fast"
        packed = np.asarray(tokens, dtype="<i8").tobytes() if fast and tokens else b""
        for i in range(0, len(tokens), size):
            begin = start + i
            extra = block_extra_keys(begin, begin + size, lora_name, cache_salt, mm,
                                     lora_path, self.key_scheme)
            if fast:
                buf = bytearray(digest)
                buf += packed[i * 8:(i + size) * 8]
                if extra is not None:
                    _fast_extra(buf, extra)
                digest = self._xxh(bytes(buf))
            else:
                digest = sha256_cbor((digest, tuple(tokens[i:i + size]), extra))
            out.append(digest)
        return out


__all__ = ["BlockHasher", "KEY_SCHEMES", "MMFeature", "PrefixHashState", "VLLM_DEFAULT_SEED",
           "block_extra_keys", "event_hash", "key_scheme_for", "sha256_cbor"]
