"""kvxfer.auth and the handshake machines, without I/O: proofs, replay, relay, reflection,
metadata tags."""

from __future__ import annotations

import logging

import pytest

from kvxfer import auth
from kvxfer.errors import AuthenticationFailed, LayoutMismatch, PeerUnreachable
from kvxfer.metadata import decode_metadata, encode_metadata
from kvxfer.protocol import CLOSED, E_AUTH, E_CLOSING, E_LAYOUT, Auth, Error, Hello
from kvxfer.protocol.handshake import ClientHandshake, ServerHandshake

SECRET = b"s" * 32
OTHER = b"o" * 32
DESC_C, DESC_S = b'{"c":1}', b'{"s":1}'


def fits(_: bytes) -> None:
    pass


def refuse_layout(_: bytes) -> None:
    raise LayoutMismatch("num_layers differs")


def pair(client_secret=SECRET, server_secret=SECRET, server_name="prefill", check=fits,
         admit=lambda: None):
    c = ClientHandshake("decode", DESC_C, client_secret, fits, expected="prefill")
    s = ServerHandshake(server_name, DESC_S, server_secret, check, admit)
    return c, s


def run(c: ClientHandshake, s: ServerHandshake) -> None:
    """Shuttle frames until both are done; the client raises a refusal."""
    to_server: list = [c.hello()]
    while to_server:
        to_client = [f for frame in to_server for f in s.on_event(frame)]
        to_server = [f for frame in to_client for f in c.on_event(frame)]
    assert c.done and s.done


def test_same_secret_both_sides_done():
    c, s = pair()
    run(c, s)
    assert s.peer == "decode"


def test_no_secret_is_one_hello_each_way():
    c, s = pair(None, None)
    hello = c.hello()
    assert hello.nonce == b""
    replies = s.on_event(hello)
    assert [type(f) for f in replies] == [Hello] and replies[0].proof == b"" and s.done
    assert c.on_event(replies[0]) == [] and c.done


def test_server_with_secret_refuses_a_client_without():
    c, s = pair(client_secret=None)
    (err,) = s.on_event(c.hello())
    assert isinstance(err, Error) and err.code == E_AUTH and "requires authentication" in err.message
    assert s.refused and not s.done
    with pytest.raises(AuthenticationFailed, match="requires authentication"):
        c.on_event(err)


def test_client_with_secret_refuses_a_server_without():
    c, s = pair(server_secret=None)
    (hello,) = s.on_event(c.hello())
    with pytest.raises(AuthenticationFailed, match="does not authenticate"):
        c.on_event(hello)


def test_wrong_secret_is_refused_by_the_client_at_the_server_proof():
    c, s = pair(client_secret=OTHER)
    (hello,) = s.on_event(c.hello())
    with pytest.raises(AuthenticationFailed, match="failed authentication"):
        c.on_event(hello)


def test_wrong_client_proof_is_refused_by_the_server():
    c, s = pair()
    (hello,) = s.on_event(c.hello())
    (proof,) = c.on_event(hello)
    (err,) = s.on_event(Auth(bytes(32)))
    assert isinstance(err, Error) and err.code == E_AUTH and "failed authentication" in err.message
    assert not s.done and proof.proof != bytes(32)


def test_a_recorded_proof_is_worthless_on_a_new_connection():
    c, s = pair()
    hello_c = c.hello()
    (hello_s,) = s.on_event(hello_c)
    (recorded,) = c.on_event(hello_s)
    # replay both of the client's frames, byte for byte, to a fresh server connection
    s2 = ServerHandshake("prefill", DESC_S, SECRET, fits)
    s2.on_event(hello_c)
    (err,) = s2.on_event(recorded)
    assert isinstance(err, Error) and err.code == E_AUTH and not s2.done


def test_a_proof_cannot_be_relayed_to_another_agent_or_reflected():
    c, s = pair()
    hello_c = c.hello()
    (hello_s,) = s.on_event(hello_c)
    (proof_c,) = c.on_event(hello_s)
    # the same client frames sent on to an agent of another name (a relay): refused
    other = ServerHandshake("prefill-2", DESC_S, SECRET, fits)
    (hello_o,) = other.on_event(hello_c)
    assert other.on_event(proof_c)[0].code == E_AUTH
    # the server's own proof handed back as the client's (reflection): refused
    s3 = ServerHandshake("prefill", DESC_S, SECRET, fits)
    (hello_3,) = s3.on_event(hello_c)
    assert s3.on_event(Auth(hello_3.proof))[0].code == E_AUTH
    # a server answering under another name than the metadata said: refused by the client
    c2 = ClientHandshake("decode", DESC_C, SECRET, fits, expected="prefill")
    with pytest.raises(PeerUnreachable, match="answered as 'prefill-2'"):
        c2.on_event(hello_o)


def test_proofs_cover_both_layouts():
    c, s = pair()
    hello_c = c.hello()
    swapped = Hello(hello_c.name, b'{"c":2}', nonce=hello_c.nonce)
    (hello_s,) = s.on_event(swapped)  # the server saw another descriptor than c sent
    with pytest.raises(AuthenticationFailed):
        c.on_event(hello_s)


def test_layout_and_connection_cap_are_checked_only_after_the_proof():
    c, s = pair(check=refuse_layout)
    (hello,) = s.on_event(c.hello())
    assert isinstance(hello, Hello)  # nothing said of layouts to an unproven peer
    (err,) = s.on_event(c.on_event(hello)[0])
    assert err.code == E_LAYOUT
    with pytest.raises(LayoutMismatch):
        c.on_event(err)
    c, s = pair(admit=lambda: "full")
    (err,) = s.on_event(c.on_event(s.on_event(c.hello())[0])[0])
    assert err.code == E_CLOSING and err.message == "full"


def test_unexpected_frames_and_eof_during_the_handshake():
    from kvxfer.errors import RemoteProtocolError
    from kvxfer.protocol import ReadRequest

    s = ServerHandshake("prefill", DESC_S, SECRET, fits)
    with pytest.raises(RemoteProtocolError):
        s.on_event(ReadRequest(1, 0, (0,), ((0, 1),)))
    s = ServerHandshake("prefill", DESC_S, SECRET, fits)
    assert s.on_event(CLOSED) == [] and s.refused
    c = ClientHandshake("decode", DESC_C, SECRET, fits, expected="prefill")
    with pytest.raises(PeerUnreachable):
        c.on_event(CLOSED)


def test_secret_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv(auth.ENV, raising=False)
    assert auth.resolve_secret(None) is None
    monkeypatch.setenv(auth.ENV, "e" * 20)
    assert auth.resolve_secret(None) == b"e" * 20
    assert auth.resolve_secret("x" * 16) == b"x" * 16
    with pytest.raises(ValueError, match="at least 16"):
        auth.resolve_secret(b"short")


def _meta(secret):
    import torch

    from kvxfer import KVLayout

    desc = KVLayout.vllm([torch.zeros(2, 4, 16, 2, 8)]).descriptor.to_bytes()
    return encode_metadata("prefill", "tcp", "127.0.0.1:5000", desc, b"nixl", "inc-1", secret)


def test_metadata_tags_refuse_forgery():
    tagged = _meta(SECRET)
    assert decode_metadata(tagged, SECRET).name == "prefill"
    assert decode_metadata(tagged).address == "127.0.0.1:5000"  # no secret: not checked
    with pytest.raises(AuthenticationFailed, match="carries no tag"):
        decode_metadata(_meta(None), SECRET)
    with pytest.raises(AuthenticationFailed, match="forged or altered"):
        decode_metadata(tagged.replace(b"5000", b"5001"), SECRET)
    with pytest.raises(AuthenticationFailed, match="forged or altered"):
        decode_metadata(_meta(OTHER), SECRET)


def test_listening_beyond_loopback_without_a_secret_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="kvxfer.auth"):
        auth.warn_if_open("a", "127.0.0.1:0", None)
        auth.warn_if_open("a", "[::1]:0", None)
        auth.warn_if_open("a", "localhost:0", None)
        auth.warn_if_open("a", "0.0.0.0:0", SECRET)
        assert not caplog.records
        auth.warn_if_open("a", "0.0.0.0:0", None)
    assert "without a secret" in caplog.records[0].getMessage()
