"""A TCP relay process that alters kvxfer frames in flight, for codec fault tests.

    relay = Relay(("127.0.0.1", port), direction="to_client", mutate="flip")
    ...connect to ("127.0.0.1", relay.port) instead of the peer...
    relay.stop()

It forwards bytes both ways and parses the frames of one direction (``to_client``: the
server's DATA; ``to_server``: the client's WRITE). The first ``count`` frames there with
a payload, after the HELLO, are altered: ``flip`` flips one payload bit, ``garbage``
overwrites the payload's first 32 bytes with 0xff, ``rawlen`` adds 2 to ENC's raw length.
Only frames whose ENC codec is ``codec`` (None: any) are altered.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import threading
from typing import Any, Optional

HEADER = struct.Struct("!4sBBHIQ")
ENC_SIZE = 20


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise EOFError
        out += got
    return bytes(out)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _alter(src: socket.socket, dst: socket.socket, mutate: str, count: int,
           codec: Optional[int], done: Any) -> None:
    left = count
    try:
        while True:
            head = _recv_exact(src, HEADER.size)
            _, _, ftype, _, body_len, payload_len = HEADER.unpack(head)
            body = bytearray(_recv_exact(src, body_len))
            payload = bytearray(_recv_exact(src, payload_len)) if payload_len else bytearray()
            enc_codec = body[-ENC_SIZE] if body_len >= ENC_SIZE else -1
            if left and payload_len and ftype in (3, 4) and codec in (None, enc_codec):
                left -= 1
                if mutate == "flip":
                    payload[payload_len // 2] ^= 0x10
                elif mutate == "garbage":
                    payload[:32] = b"\xff" * min(32, payload_len)
                elif mutate == "rawlen":
                    at = body_len - ENC_SIZE + 4
                    (raw,) = struct.unpack_from("!Q", body, at)
                    struct.pack_into("!Q", body, at, raw + 2)
                with done.get_lock():
                    done.value += 1
            dst.sendall(head + bytes(body) + bytes(payload))
    except (EOFError, OSError):
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(target: tuple[str, int], direction: str, mutate: str, count: int,
           codec: Optional[int], conn: Any, done: Any) -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    conn.send(lsock.getsockname()[1])
    while True:
        client, _ = lsock.accept()
        server = socket.create_connection(target)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = (client, server)
        down = (server, client)
        plain, altered = (up, down) if direction == "to_client" else (down, up)
        threading.Thread(target=_pipe, args=plain, daemon=True).start()
        threading.Thread(target=_alter, args=(*altered, mutate, count, codec, done),
                         daemon=True).start()


class Relay:
    """The relay in a process of its own; ``port`` is where it listens."""

    def __init__(self, target: tuple[str, int], direction: str = "to_client",
                 mutate: str = "flip", count: int = 1, codec: Optional[int] = None) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.altered = ctx.Value("i", 0)  # frames altered so far
        self.proc = ctx.Process(target=_serve, args=(target, direction, mutate, count, codec,
                                                     child, self.altered), daemon=True)
        self.proc.start()
        if not parent.poll(30):
            raise TimeoutError("relay did not start")
        self.port: int = parent.recv()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)
