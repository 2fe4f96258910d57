"""Property tests of the sans-I/O protocol (hypothesis), and a short atheris run.

Any bytes, split anywhere, give frames or a ProtocolError and nothing else; every frame
round-trips; the handshake accepts no unproven peer; metadata and notes parse or are
refused. The long coverage-guided run (1M inputs) is ``tests/fuzz/fuzz_protocol.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvxfer.protocol import (NEED_DATA, Auth, Close, Completion, Connection, Data, Error, Hello,
                             PayloadData, ReadRequest, Write)
from kvxfer.protocol import frames as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz"))
import targets  # noqa: E402

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "fuzz_protocol.py")
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

u16, u32, u64 = (st.integers(0, (1 << b) - 1) for b in (16, 32, 64))
text = st.text(max_size=40)
short = st.binary(max_size=F.MAX_NONCE)
runs = st.lists(st.tuples(u32, st.integers(1, (1 << 32) - 1)), max_size=8).map(tuple)
layers = st.lists(u16, max_size=8).map(tuple)
heads = st.one_of(st.none(), st.tuples(st.integers(0, 100), st.integers(1, 100))
                  .filter(lambda h: h[0] < h[1]))
HELLO = st.builds(Hello, text.filter(lambda s: len(s.encode()) <= F.MAX_NAME),
                  st.binary(max_size=64), nonce=short, proof=short)
FRAMES = st.one_of(
    st.builds(Auth, short),
    st.builds(ReadRequest, u64, u32, layers, runs, heads),
    st.builds(Write, u64, u32, layers, runs, st.integers(0, 64), st.booleans(),
              st.binary(max_size=32), heads),
    st.builds(Data, u64, u32, st.integers(0, 64)),
    st.builds(Completion, u64, u32),
    st.builds(Error, u64, u32, u16, text),
    st.builds(Close, text),
)


@SETTINGS
@given(st.lists(HELLO, max_size=1), st.lists(FRAMES, min_size=1, max_size=6), st.data())
def test_every_frame_round_trips_split_anywhere(hello, frames, data):
    frames = hello + frames  # a HELLO comes first or not at all
    enc = Connection(expect_hello=False)
    wire = b"".join(b"".join(bytes(b) for b in enc.send(f, [os.urandom(getattr(f, "payload_len",
                                                                                 0))]))
                    for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    conn = Connection(expect_hello=False)
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
        if b > a:
            conn.receive_data(wire[a:b])
        while (ev := conn.next_event()) is not NEED_DATA:
            got.append(ev)
    assert [ev for ev in got if not isinstance(ev, PayloadData)] == frames


@SETTINGS
@given(st.binary(max_size=2048))
def test_any_bytes_split_anywhere_give_frames_or_a_protocol_error(data):
    targets.frames(data)


@SETTINGS
@given(st.binary(max_size=2048))
def test_a_frame_prefix_then_garbage(data):
    targets.frames(b"\x02" + targets.seeds()[0][1:60] + data)


@SETTINGS
@given(st.binary(max_size=2048))
def test_the_handshake_accepts_no_unproven_peer(data):
    targets.handshake(data)
    targets.handshake(b"\x01" + targets.seeds()[2][1:] + data)  # a real HELLO, then anything


@SETTINGS
@given(st.binary(max_size=2048))
def test_metadata_and_notes_parse_or_are_refused(data):
    targets.metadata(data)
    targets.notes(data)


def test_short_coverage_guided_run_finds_no_crash(tmp_path):
    pytest.importorskip("atheris")
    out = subprocess.run([sys.executable, FUZZ, "-atheris_runs=20000", "-seed=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 20000" in out.stderr
