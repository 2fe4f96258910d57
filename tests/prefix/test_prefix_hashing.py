"""Block hashing: vLLM sha256_cbor vectors from an independent cbor2 + hashlib reference."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import cbor2
import pytest

from kvxfer.prefix.hashing import (BlockHasher, block_extra_keys, event_hash, key_scheme_for,
                                   sha256_cbor)


def ref_sha256_cbor(value: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def ref_vllm_hashes(tokens, block_size, seed="vllm-none-hash", lora=None, salt=None, mm=(),
                    lora_path=None, tagged=True):
    """vLLM's get_request_block_hasher + hash_block_tokens, written from its source:
    tagged extra keys as vLLM >= 0.31 hashes them, untagged as 0.30 and older did."""
    parent = ref_sha256_cbor(seed)
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        end = start + block_size
        extra = [] if lora is None else [("lora", lora, lora_path) if tagged else lora]
        extra += [("mm", ident, off - start) if tagged else (ident, off - start)
                  for ident, off, length in mm if end > off and start < off + length]
        if start == 0 and salt:
            extra.append(("cache_salt", salt) if tagged else salt)
        parent = ref_sha256_cbor((parent, tuple(tokens[start:end]),
                                  tuple(extra) if extra else None))
        out.append(parent)
    return out


def random_tokens(rng: random.Random, n: int) -> list[int]:
    # Spread over every CBOR integer head width (inline, 1, 2, 4 and 8 bytes).
    widths = [23, 255, 65535, 2**32 - 1, 2**40]
    return [rng.randint(0, rng.choice(widths)) for _ in range(n)]


@pytest.mark.parametrize("scheme", ["tagged", "untagged"])
def test_vllm_mode_matches_reference_for_random_requests(scheme):
    rng = random.Random(1234)
    for case in range(40):
        block_size = rng.choice([1, 3, 16, 32])
        tokens = random_tokens(rng, rng.randint(0, 6 * block_size + 5))
        lora = rng.choice([None, "adapter-a", "lörä/ü"])
        path = None if lora is None else f"/adapters/{lora}"
        salt = rng.choice([None, "", "salt-" + str(case)])
        seed = rng.choice([None, "0", "42", "", "σπόρος"])
        hasher = BlockHasher(block_size, mode="vllm", seed=seed, key_scheme=scheme)
        got = hasher.hash_blocks(tokens, lora_name=lora, cache_salt=salt, lora_path=path)
        want = ref_vllm_hashes(tokens, block_size, "vllm-none-hash" if seed is None else seed,
                               lora, salt, lora_path=path, tagged=scheme == "tagged")
        assert got == want, (case, block_size, lora, salt, seed)


@pytest.mark.parametrize("scheme", ["tagged", "untagged"])
def test_vllm_mode_multimodal_keys_match_reference(scheme):
    rng = random.Random(7)
    tokens = random_tokens(rng, 100)
    mm = [("img-a", 5, 20), ("img-b", 40, 3), ("img-c", 43, 30)]
    hasher = BlockHasher(16, mode="vllm", key_scheme=scheme)
    assert hasher.hash_blocks(tokens, mm_keys=mm, lora_name="l", lora_path="/p") == \
        ref_vllm_hashes(tokens, 16, lora="l", mm=mm, lora_path="/p", tagged=scheme == "tagged")
    # The block after the last item is hashed without multimodal keys.
    assert block_extra_keys(80, 96, None, None, mm) is None
    assert block_extra_keys(32, 48, None, None, mm, scheme="untagged") == \
        (("img-b", 8), ("img-c", 11))
    assert block_extra_keys(32, 48, None, None, mm) == (("mm", "img-b", 8), ("mm", "img-c", 11))
    assert block_extra_keys(0, 16, "l", "s", mm[:1], "/p") == \
        (("lora", "l", "/p"), ("mm", "img-a", 5), ("cache_salt", "s"))


def test_tagged_keys_keep_lora_salt_and_path_apart():
    tokens = list(range(16))
    h = BlockHasher(16, mode="vllm")
    # Untagged, a LoRA named X and a salt X hashed the same; tagged they differ.
    old = BlockHasher(16, mode="vllm", key_scheme="untagged")
    assert old.hash_blocks(tokens, lora_name="X") == old.hash_blocks(tokens, cache_salt="X")
    assert h.hash_blocks(tokens, lora_name="X", lora_path="/x") != \
        h.hash_blocks(tokens, cache_salt="X")
    # Re-pointing a name at another adapter changes the hash.
    assert h.hash_blocks(tokens, lora_name="X", lora_path="/a") != \
        h.hash_blocks(tokens, lora_name="X", lora_path="/b")
    with pytest.raises(ValueError, match="lora_path"):
        h.hash_blocks(tokens, lora_name="X")
    with pytest.raises(ValueError, match="lora_path"):
        h.start(lora_name="X")
    with pytest.raises(ValueError, match="key_scheme"):
        BlockHasher(16, key_scheme="typed")


def test_key_scheme_follows_the_vllm_release():
    assert [key_scheme_for(v) for v in ("0.30.0", "0.31.0", "0.33.0", "0.34.1", "1.0")] == \
        ["untagged", "tagged", "tagged", "tagged", "tagged"]
    assert BlockHasher.for_vllm(16, "0.30.0").key_scheme == "untagged"
    assert BlockHasher.for_vllm(16, "0.33.0").mode == "vllm"
    with pytest.raises(ValueError, match="not a vLLM version"):
        key_scheme_for("latest")


def test_seed_gives_the_root_and_default_is_vllm_none_hash():
    assert BlockHasher(16, mode="vllm").root == ref_sha256_cbor("vllm-none-hash")
    assert BlockHasher(16, mode="vllm", seed="0").root == ref_sha256_cbor("0")
    a = BlockHasher(4, mode="vllm", seed="1").hash_blocks(range(8))
    b = BlockHasher(4, mode="vllm", seed="2").hash_blocks(range(8))
    assert a[0] != b[0] and a[1] != b[1]


def test_sha256_cbor_equals_cbor2_canonical_on_boundaries():
    values = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -24, -25,
              -256, -(2**64), None, True, False, "", "x" * 300, "ünïcødé", b"", b"\x00" * 70,
              (), (1, (b"a", "b"), None), [1, 2, 3]]
    for value in values:
        assert sha256_cbor(value) == ref_sha256_cbor(value), value
    with pytest.raises(TypeError):
        sha256_cbor(1.5)


def test_event_hash_is_last_eight_bytes_big_endian():
    digest = BlockHasher(16, mode="vllm").hash_blocks(range(16))[0]
    assert event_hash(digest) == int.from_bytes(digest[-8:], "big")
    assert event_hash(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert event_hash(-1) == 2**64 - 1


@pytest.mark.parametrize("mode", ["fast", "vllm"])
def test_partial_block_is_not_hashed_and_chain_propagates(mode):
    hasher = BlockHasher(4, mode=mode)
    tokens = list(range(100, 114))
    hashes = hasher.hash_blocks(tokens)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    changed = tokens.copy()
    changed[9] += 1  # block 2
    other = hasher.hash_blocks(changed)
    assert other[:2] == hashes[:2] and other[2] != hashes[2]
    changed[0] += 1  # block 0: every later block changes with it
    assert all(x != y for x, y in zip(hasher.hash_blocks(changed), hashes))


@pytest.mark.parametrize("mode", ["fast", "vllm"])
def test_incremental_extension_equals_one_shot(mode):
    rng = random.Random(99)
    hasher = BlockHasher(8, mode=mode)
    tokens = random_tokens(rng, 203)
    whole = hasher.hash_blocks(tokens, lora_name="l", cache_salt="s", mm_keys=[("m", 30, 20)],
                               lora_path="/l")
    state = hasher.start(lora_name="l", cache_salt="s", mm_features=[("m", 30, 20)],
                         lora_path="/l")
    got, at = [], 0
    while at < len(tokens):
        step = rng.randint(0, 13)
        end = min(at + step, len(tokens))
        new = state.extend(tokens[at:end])
        assert len(new) == end // 8 - at // 8
        got += new
        at = end
    assert got == whole == state.hashes
    assert len(state.pending) == len(tokens) % 8


def test_fast_mode_extra_keys_and_seed_change_digests():
    tokens = list(range(32))
    base = BlockHasher(16).hash_blocks(tokens)
    assert len(base[0]) == 16
    assert BlockHasher(16).hash_blocks(tokens, lora_name="a", lora_path="/a") != base
    salted = BlockHasher(16).hash_blocks(tokens, cache_salt="s")
    assert salted[0] != base[0] and salted[1] != base[1]  # chained through block 0
    assert BlockHasher(16, seed="x").hash_blocks(tokens) != base
    assert BlockHasher(16).hash_blocks(tokens, lora_name="ab", lora_path="/ab") != \
        BlockHasher(16).hash_blocks(tokens, mm_keys=[("ab", 0, 1)])


def test_fast_mode_is_stable_across_processes():
    code = ("from kvxfer.prefix.hashing import BlockHasher;"
            "print(BlockHasher(4).hash_blocks(range(12), lora_name='l', lora_path='/l')[-1]"
            ".hex())")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=60, check=True).stdout.strip())
    assert outs == {BlockHasher(4).hash_blocks(range(12), lora_name="l", lora_path="/l")[-1]
                    .hex()}


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        BlockHasher(0)
    with pytest.raises(ValueError):
        BlockHasher(16, mode="sha1")
