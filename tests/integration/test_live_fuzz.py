"""Fuzzing a live agent: an authenticated raw client sends READ and WRITE frames with
random layers, runs, head ranges and payload lengths (most of them wrong), and garbage.

The agent's KV cache is surrounded by canary blocks (the registered tensors are views
into larger ones). After every answer: the canaries are untouched, no block outside the
runs a completed write named has changed, a refused request changed nothing, and the
agent still serves a real peer at the end.
"""

from __future__ import annotations

import random
import socket

import pytest
import torch

import kvxfer
from kvxfer.protocol import (CLOSED, NEED_DATA, Completion, Connection, Data, Error,
                             ReadRequest, Write)
from kvxfer.protocol.handshake import ClientHandshake

from rawclient import events, raw_client

SECRET = b"live-fuzz-secret-0123456789abcdef"
BLOCKS, LAYERS, BS, HEADS, DIM = 24, 3, 4, 4, 8
FRAMES = 3000


def _canaried_cache(seed: int) -> tuple[list[torch.Tensor], kvxfer.KVLayout]:
    """FlashInfer-order tensors [BLOCKS + 2, 2, BS, HEADS, DIM] per layer; the layout is
    blocks 1..BLOCKS of each (block 0 and the last are canaries)."""
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randint(0, 256, (BLOCKS + 2, 2, BS, HEADS, DIM * 2), dtype=torch.uint8,
                          generator=gen).view(torch.bfloat16) for _ in range(LAYERS)]
    return full, kvxfer.KVLayout.vllm([t[1:-1] for t in full], kv_dim=1)


def _state(full: list[torch.Tensor]) -> list[list[bytes]]:
    """Per layer, per underlying block (canaries included), its bytes."""
    return [[t[b].contiguous().view(torch.uint8).numpy().tobytes() for b in range(BLOCKS + 2)]
            for t in full]


def _connect(meta: bytes, desc: bytes, name: str) -> tuple[socket.socket, Connection, Connection]:
    sock, conn = raw_client(meta)
    enc = Connection(expect_hello=False)
    shake = ClientHandshake("fuzzer", desc, SECRET, lambda _: None, expected=name)
    sock.sendall(enc.encode(shake.hello()))
    while not shake.done:
        for frame in shake.on_event(events(sock, conn, 1)[0]):
            sock.sendall(enc.encode(frame))
    return sock, conn, enc


def _random_frame(rng: random.Random, block_bytes: int) -> tuple[object, int]:
    """A READ or WRITE with fields from plausible to absurd; (frame, payload bytes)."""
    def layer() -> int:
        return rng.choice([rng.randrange(LAYERS), rng.randrange(LAYERS + 3), 65535])

    def run() -> tuple[int, int]:
        start = rng.choice([rng.randrange(BLOCKS), rng.randrange(BLOCKS + 4), 2**32 - 1])
        return start, rng.choice([1, rng.randrange(1, 5), rng.randrange(1, BLOCKS + 3)])

    layers = tuple(layer() for _ in range(rng.randrange(0, 4)))
    runs = tuple(run() for _ in range(rng.randrange(0, 4)))
    heads = rng.choice([None, None, (0, HEADS), (1, 3), (2, HEADS + 2), (0, 1)])
    rid = rng.randrange(1, 1 << 20)
    if rng.random() < 0.3:
        return ReadRequest(rid, 0, layers, runs, heads), 0
    per_block = block_bytes * 2 * len(layers)  # K and V of each layer
    if heads is not None:
        per_block = per_block * (heads[1] - heads[0]) // HEADS
    exact = per_block * sum(n for _, n in runs)
    size = rng.choice([exact, exact, max(0, exact - 1), exact + 7, rng.randrange(0, 4096)])
    size = min(size, 1 << 20)
    return Write(rid, 0, layers, runs, size, last=rng.random() < 0.5,
                 notify=rng.choice([b"", b"\x00note"])), size


def _named(frame: Write) -> set[int]:
    return {b + 1 for start, n in frame.runs for b in range(start, start + n)}  # +1: canary


def _answer(sock: socket.socket, conn: Connection) -> object:
    """The next frame from the agent, its payload drained; CLOSED if it hung up."""
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            data = sock.recv(1 << 16)
            conn.receive_data(data)
            continue
        if isinstance(ev, Data):
            while conn.payload_remaining:
                got = conn.next_event()
                if got is NEED_DATA:
                    conn.receive_data(sock.recv(1 << 16))
        return ev


@pytest.mark.parametrize("seed", [1, 2])
def test_random_frames_never_touch_blocks_they_do_not_name(seed):
    rng = random.Random(seed)
    full, layout = _canaried_cache(seed)
    with kvxfer.Agent("target", secret=SECRET) as agent:
        agent.register_kv_cache(layout)
        meta, desc = agent.metadata(), layout.descriptor.to_bytes()
        sock, conn, enc = _connect(meta, desc, "target")
        before = _state(full)
        outcomes = {"completed": 0, "refused": 0, "reconnected": 0, "data": 0}
        for i in range(FRAMES):
            if rng.random() < 0.03:  # garbage: the connection ends, nothing changes
                sock.sendall(rng.randbytes(rng.randrange(20, 64)))  # >= a header: answered
                frame, size = None, 0
            else:
                frame, size = _random_frame(rng, layout.regions[0].block_bytes)
                sock.sendall(b"".join(bytes(b) for b in enc.send(frame, [rng.randbytes(size)])))
            try:
                ev = _answer(sock, conn)
            except (OSError, kvxfer.ProtocolError):
                ev = CLOSED
            after = _state(full)
            changed = {b for layer in range(LAYERS) for b in range(BLOCKS + 2)
                       if after[layer][b] != before[layer][b]}
            assert 0 not in changed and BLOCKS + 1 not in changed, f"canary hit at frame {i}"
            if isinstance(ev, Completion) and isinstance(frame, Write):
                assert changed <= _named(frame), (i, frame, changed)
                outcomes["completed"] += 1
            else:
                assert not changed, (i, frame, ev, changed)
                outcomes["data" if isinstance(ev, Data) else "refused"] += 1
            before = after
            if ev is CLOSED or (isinstance(ev, Error) and ev.request_id == 0) or frame is None:
                sock.close()
                sock, conn, enc = _connect(meta, desc, "target")
                outcomes["reconnected"] += 1
        sock.close()
        assert outcomes["completed"] and outcomes["refused"] and outcomes["data"], outcomes
        # the agent still serves a real peer, byte-exact
        src_full, src = _canaried_cache(seed + 10)
        with kvxfer.Agent("peer", secret=SECRET) as other:
            other.register_kv_cache(src)
            other.write(other.add_peer(meta), [0, 1], [5, 6]).wait(20)
        for t, s in zip(full, src_full):
            assert torch.equal(t[6:8].view(torch.uint8), s[1:3].view(torch.uint8))
