"""A TCP forwarder that misbehaves on purpose, between an agent and the peer it dials.

The fault matrix points an agent at the relay (metadata with the relay's address);
the relay dials the real peer and pumps bytes both ways, one thread per direction.
What it does to the bytes going "down" (peer -> dialler) or "up" (dialler -> peer):

    jitter  each recv'd piece waits a random 0..``jitter_ms`` before it is sent on
            (order kept, as TCP keeps it: delay with jitter, not reordering)
    stall   after ``after`` bytes, nothing more is sent on for ``seconds``; then the
            held bytes go on (they arrive after the dialler's deadline)
    flip    the byte at stream offset ``at`` is XORed with 0xFF, once per connection
    frames  the stream is parsed as kvxfer frames, and the first ``count`` DATA or WRITE
            frames with a payload (whose ENC codec is ``codec``; None: any) are altered:
            ``mutate`` "flip" flips one payload bit, "garbage" overwrites the payload's
            first 32 bytes with 0xff, "rawlen" adds 2 to ENC's raw length (codec tests)

Every connection the relay accepts is relayed the same way (nccl's control connection
goes through it; its Gloo payloads do not). Offsets count the bytes of a direction
over all its connections (one, but for nccl's rendezvous). Commands on the Pipe:
"stats" (bytes each way, flips, stalls, altered frames so far), ("set", way, mode) to change what
happens from now on (``at``/``after`` are then counted from here), "stop".
"""

from __future__ import annotations

import multiprocessing as mp
import random
import select
import socket
import struct
import threading
import time
from typing import Any, Optional

HEADER = struct.Struct("!4sBBHIQ")  # a frame's header (kvxfer/protocol/frames.py)
ENC_SIZE = 20  # the ENC field that ends a DATA or WRITE body
T_WRITE, T_DATA = 3, 4


def _pump(src: socket.socket, dst: socket.socket, mode: dict, stats: dict, way: str,
          stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            data = src.recv(65536)
            if not data:
                break
            kind, sent = mode.get("kind"), stats[way]  # offsets count over the direction
            if kind == "jitter":
                time.sleep(random.uniform(0, mode["jitter_ms"]) / 1000)
            elif kind == "stall" and sent + len(data) > mode["after"] >= sent:
                cut = mode["after"] - sent
                dst.sendall(data[:cut])
                stats[way] += cut
                data = data[cut:]
                stats["stalls"] += 1
                stop.wait(mode["seconds"])
            elif kind == "flip" and sent <= mode["at"] < sent + len(data):
                i = mode["at"] - sent
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                stats["flips"] += 1
            dst.sendall(data)
            stats[way] += len(data)
    except OSError:
        pass
    finally:
        _shut(src, dst)


def _shut(*socks: socket.socket) -> None:
    for s in socks:  # one side gone: both go, as a real middlebox's do
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise EOFError
        out += got
    return bytes(out)


def _alter_frames(src: socket.socket, dst: socket.socket, mode: dict, stats: dict, way: str,
                  stop: threading.Event) -> None:
    left, codec = mode["count"], mode.get("codec")
    try:
        while not stop.is_set():
            head = _recv_exact(src, HEADER.size)
            _, _, ftype, _, body_len, payload_len = HEADER.unpack(head)
            body = bytearray(_recv_exact(src, body_len))
            payload = bytearray(_recv_exact(src, payload_len)) if payload_len else bytearray()
            enc_codec = body[-ENC_SIZE] if body_len >= ENC_SIZE else -1
            if left and payload_len and ftype in (T_WRITE, T_DATA) and codec in (None, enc_codec):
                left -= 1
                if mode["mutate"] == "flip":
                    payload[payload_len // 2] ^= 0x10
                elif mode["mutate"] == "garbage":
                    payload[:32] = b"\xff" * min(32, payload_len)
                elif mode["mutate"] == "rawlen":
                    at = body_len - ENC_SIZE + 4
                    (raw,) = struct.unpack_from("!Q", body, at)
                    struct.pack_into("!Q", body, at, raw + 2)
                stats["altered"] += 1
            dst.sendall(head + bytes(body) + bytes(payload))
            stats[way] += len(head) + body_len + payload_len
    except (EOFError, OSError):
        pass
    finally:
        _shut(src, dst)


def relay_main(conn: Any, netns: str | None, listen: str, target: tuple[str, int],
               down: dict, up: dict, verbatim: tuple[int, ...] = ()) -> None:
    """Relay connections on ``listen`` (host) to ``target``; sends the port first.

    ``verbatim``: ports of the target's host relayed as they are, on the same port
    here (nccl's TCPStore, which the dialler finds at the address of the control
    connection and the store port of the metadata)."""
    if netns is not None:
        import netns as _netns

        _netns.enter(netns)
    server = socket.create_server((listen, 0))
    servers = {server: (target, "faulty")}
    for port in verbatim:
        servers[socket.create_server((listen, port))] = ((target[0], port), "verbatim")
    conn.send(server.getsockname()[1])
    stop = threading.Event()
    stats = {"down": 0, "up": 0, "flips": 0, "stalls": 0, "altered": 0, "connections": 0}
    modes = {"down": dict(down), "up": dict(up)}
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []
    try:
        while True:
            if conn.poll():
                cmd = conn.recv()
                if cmd == "stop":
                    break
                if cmd[0] == "set":  # mutated in place: the pumps see it at their next recv
                    _, way, mode = cmd
                    mode = dict(mode)
                    for key in ("at", "after"):
                        if key in mode:
                            mode[key] += stats[way]
                    modes[way].clear()
                    modes[way].update(mode)
                conn.send(dict(stats))
            for ready in select.select(list(servers), [], [], 0.05)[0]:
                dest, how = servers[ready]
                client, _ = ready.accept()
                if how == "faulty":
                    stats["connections"] += 1
                    socks += _relay(client, dest, modes, stats, stop, threads)
                else:  # its own counters and no faults
                    socks += _relay(client, dest, {"down": {}, "up": {}},
                                    {"down": 0, "up": 0, "altered": 0}, stop, threads)
    finally:
        stop.set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in threads:
            t.join(5)
        for srv in servers:
            srv.close()


def _relay(client: socket.socket, dest: tuple[str, int], modes: dict, stats: dict,
           stop: threading.Event, threads: list[threading.Thread]) -> list[socket.socket]:
    """Pump ``client`` <-> a new connection to ``dest``, one thread each way."""
    client.settimeout(None)
    peer = socket.create_connection(dest, timeout=5)
    peer.settimeout(None)
    for s in (client, peer):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for src, dst, way in ((peer, client, "down"), (client, peer, "up")):
        pump = _alter_frames if modes[way].get("kind") == "frames" else _pump
        t = threading.Thread(target=pump, daemon=True,
                             args=(src, dst, modes[way], stats, way, stop))
        t.start()
        threads.append(t)
    return [client, peer]


class Relay:
    """A relay on loopback in a process of its own, altering frames one way.

    ``direction`` "to_client" alters the served side's DATA, "to_server" the client's
    WRITE; ``mutate``, ``count`` and ``codec`` as for ``frames`` above. Agents dial
    ``port`` instead of the peer's."""

    def __init__(self, target: tuple[str, int], direction: str = "to_client",
                 mutate: str = "flip", count: int = 1, codec: Optional[int] = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        frames = {"kind": "frames", "mutate": mutate, "count": count, "codec": codec}
        down, up = (frames, {}) if direction == "to_client" else ({}, frames)
        self.proc = ctx.Process(target=relay_main, daemon=True,
                                args=(child, None, "127.0.0.1", target, down, up))
        self.proc.start()
        if not self.conn.poll(30):
            raise TimeoutError("relay did not start")
        self.port: int = self.conn.recv()

    @property
    def altered(self) -> int:
        """Frames altered so far."""
        self.conn.send("stats")
        if not self.conn.poll(10):
            raise TimeoutError("relay did not answer")
        return self.conn.recv()["altered"]

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
