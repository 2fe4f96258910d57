"""Checksums over NIXL (``Agent(checksum=True)``): the reader verifies, the receiver checks.

Theory of operation
-------------------
NIXL moves bytes one-sidedly, so no code of ours runs beside the bytes on the far side.
What checksums can still promise differs by direction.

Reads are verified before a byte reaches the KV cache. A read already lands in a buffer
of ours (:mod:`.nixl_landing`); the reader hashes it, asks the owner for the xxh3-64 of
the same blocks (a detached READ frame, :func:`kvxfer.protocol.frames.encode_detached`,
as a NIXL notification) and places the chunk only when the owner's answer (a detached
DATA frame whose ENC carries the sum) agrees::

    reader                                         owner (its poll thread)
    READ xfer -> landing buffer, DONE
    xxh3(landing)             KVXQ READ(rid, chunk, layers, runs, heads) ->
                                                   memory.check (bounds, as a READ's)
                           <- KVXA DATA(rid, chunk, ENC(raw_len, xxh3 of its blocks))
                              or KVXA ERROR(rid, chunk, E_RANGE | E_PROTOCOL, why)
    equal: unpack into the blocks (data_lock, handle active); else the handle fails
    (ChecksumMismatch, or RemoteError), the landing buffer goes back, nothing placed

The owner cannot send a NIXL notification to an agent whose metadata it has not
loaded, and a reader is usually not one of its peers. So a reader that checksums
introduces itself when it connects (KVXI: its NIXL metadata, tagged with the shared
secret when there is one) and waits, within ``connect_timeout``, for the owner's
acknowledgement (KVXA COMPLETION(0, 0)); an owner that does not acknowledge (a kvxfer
without nixl checksums, or a stalled one) fails ``add_peer`` with PeerUnreachable. The
owner keeps these reply links, at most ``max_connections``, oldest dropped first.
Every owner answers, whatever its own ``checksum`` setting; an owner that has it on
says so in its metadata, and its readers and writers then checksum too (as on the
two-sided backends: on when either side asks). An answer that does not come fails the
read at its deadline (the Agent's watchdog), like any transfer.

Writes land straight in the receiver's blocks. The writer hashes each chunk's source
(after the engine's event) when it posts it, and once the xfer is DONE, before any
note that announces it, sends KVXS WRITE(rid, chunk, layers, runs, heads, ENC(xxh3));
for a write stream, its notify field holds the stream's key (a NOTE_LAYERS note). The
receiver checks the frame (``memory.check``), hashes those blocks and compares. A
mismatch cannot be undone (the bytes are in place): the stream's ``incoming()`` fails
with ChecksumMismatch, a plain write is logged, and the writer's handle is not told.

A request to hash is bounded like a READ: layers and blocks inside the registered
cache, no block twice, at most one frame's payload of bytes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from ..auth import check_metadata_tag, metadata_tag
from ..codec import checksum, checksum_parts
from ..errors import (AuthenticationFailed, BlockOutOfRange, ChecksumMismatch,
                      PeerUnreachable, ProtocolError, RemoteError, RemoteProtocolError,
                      TransferFailed)
from ..handle import TransferHandle
from ..heads import HeadRange
from ..logs import get_logger
from ..memory import RegisteredMemory
from ..plan import Chunk
from ..protocol.frames import (E_PROTOCOL, E_RANGE, NOTE_LAYERS, Completion, Data, Encoding,
                               Error, Frame, Note, ReadRequest, Write, decode_detached,
                               decode_note, encode_detached, encode_note)
from .nixl_landing import Landing
from .nixl_peers import Key, NixlPeer

log = get_logger("kvxfer.nixl")

INTRO = b"KVXI"  # a reader's NIXL metadata, so the owner can answer it
ASK = b"KVXQ"  # READ: hash these blocks of yours
ANSWER = b"KVXA"  # DATA (the sum), ERROR (refused) or COMPLETION(0, 0) (introduced)
SUM = b"KVXS"  # WRITE: what a written chunk should hold
PREFIXES = (INTRO, ASK, ANSWER, SUM)
# Called (poll thread, unlocked) with (chunk, landing tensor) after a read landed and
# before it is hashed; tests corrupt the landing buffer or stall the owner there.
LandedHook = Callable[[Chunk, torch.Tensor], None]


def tensor_checksum(t: torch.Tensor, memory: Optional[RegisteredMemory] = None) -> int:
    """xxh3-64 of a contiguous uint8 tensor's bytes. A CUDA tensor is copied to pinned
    host memory on the calling thread's own stream (``memory.thread_stream()``), which
    alone is waited for: never the engine's stream or the device."""
    if t.device.type == "cpu":
        return checksum(memoryview(t.numpy()))
    assert memory is not None, "a CUDA tensor is copied on the backend thread's stream"
    host = torch.empty(t.numel(), dtype=torch.uint8, pin_memory=True)
    stream = memory.thread_stream()
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    stream.synchronize()
    return checksum(memoryview(host.numpy()))


def blocks_checksum(memory: RegisteredMemory, layers: tuple[int, ...] | list[int],
                    runs: tuple[tuple[int, int], ...], heads: Optional[HeadRange]) -> int:
    """xxh3-64 of a chunk's blocks in wire order (as packed, as landed).

    Raises:
        BlockOutOfRange: the chunk is outside the layout or names a block twice (checked
            before any work).
    """
    nbytes = memory.check(layers, runs, heads)
    if memory.is_host and heads is None:
        return checksum_parts(memory.host_buffers(layers, runs))
    packed = torch.empty(nbytes, dtype=torch.uint8, device=memory.layout.device)
    memory.pack_into(layers, runs, packed, heads)
    return tensor_checksum(packed, memory)


def answer(memory: RegisteredMemory, raw: bytes) -> Frame:
    """The owner's answer to a KVXQ notification's bytes: DATA with the sum, or ERROR."""
    try:
        req = decode_detached(raw)
    except ProtocolError as exc:
        return Error(0, 0, E_PROTOCOL, f"not a checksum request: {exc}")
    if not isinstance(req, ReadRequest):
        return Error(0, 0, E_PROTOCOL, f"not a checksum request: {type(req).__name__}")
    try:
        nbytes = memory.check(req.layers, req.runs, req.heads)
        value = blocks_checksum(memory, req.layers, req.runs, req.heads)
    except BlockOutOfRange as exc:
        return Error(req.request_id, req.chunk, E_RANGE, str(exc))
    return Data(req.request_id, req.chunk, nbytes, Encoding(raw_len=nbytes, checksum=value))


def encode_intro(nixl_md: bytes, secret: Optional[bytes]) -> bytes:
    tag = metadata_tag(secret, nixl_md) if secret else ""
    head = json.dumps({"tag": tag}).encode()
    return INTRO + len(head).to_bytes(2, "big") + head + nixl_md


def decode_intro(raw: bytes, secret: Optional[bytes], sender: str) -> bytes:
    """The NIXL metadata in a KVXI notification.

    Raises:
        RemoteProtocolError: malformed.
        AuthenticationFailed: this agent has a secret and the tag is not of it.
    """
    try:
        n = int.from_bytes(raw[len(INTRO):len(INTRO) + 2], "big")
        head = json.loads(raw[len(INTRO) + 2:len(INTRO) + 2 + n])
        md = raw[len(INTRO) + 2 + n:]
        tag = head["tag"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed introduction from {sender!r}: {exc}") from exc
    if secret:
        check_metadata_tag(secret, md, tag, sender)
    return md


class NixlChecksums:
    """Both ends of nixl checksums; a mixin of :class:`~kvxfer.backends.nixl.NixlBackend`
    (which owns the attributes below). Methods named ``_on_*`` run on the poll thread
    under ``_cond`` (they return callbacks to run unlocked); the others take it."""

    _cond: threading.Condition
    _agent: Any
    _memory: Optional[RegisteredMemory]
    _peers: list[NixlPeer]
    _landings: Any
    agent_name: str
    config: Any
    on_corrupt: Any
    _land: Callable[..., None]
    _remove_remote: Callable[[str], None]

    def _init_checksums(self) -> None:
        self._replies: OrderedDict[str, bytes] = OrderedDict()  # reply links: name -> md
        self.landed_hook: Optional[LandedHook] = None  # tests only
        # Tests only: called (poll thread, unlocked) with a write's checked WRITE frame
        # before the landed blocks are hashed.
        self.sum_hook: Optional[Callable[[Write], None]] = None
        self.verified_chunks = 0  # read chunks whose sum matched the owner's
        self.checked_writes = 0  # incoming write chunks whose sum matched
        self.corrupt_writes = 0  # incoming write chunks whose sum did not match

    # ---------------------------------------------------------- reader side
    def _introduce(self, peer: NixlPeer) -> None:
        """Send our NIXL metadata to ``peer`` and wait for its acknowledgement.

        Raises:
            PeerUnreachable: no acknowledgement within ``connect_timeout``.
        """
        with self._cond:
            intro = encode_intro(self._agent.get_agent_metadata(), self.config.secret)
            self._agent.send_notif(peer.nixl_name, intro)
        if not peer.introduced.wait(self.config.connect_timeout):
            raise PeerUnreachable(
                f"peer {peer.name!r} did not acknowledge our checksum introduction within "
                f"{self.config.connect_timeout} s (a kvxfer without nixl checksums, another "
                "secret, or a stalled peer): checksummed transfers need its answers")

    def _verify_read(self, peer: NixlPeer, handle: TransferHandle, chunk: Chunk,
                     landing: Landing, key: Key, nbytes: int) -> None:
        """A read chunk landed: hash it and ask the owner for its sum. Unlocked."""
        if not handle.active:  # failing (settled by quiesce): nothing to verify
            with self._cond:
                self._landings.give(landing)
            return
        hook = self.landed_hook
        if hook is not None:
            hook(chunk, landing.tensor)
        ours = tensor_checksum(landing.tensor[:nbytes], self._memory)
        ask = ASK + encode_detached(ReadRequest(handle.request_id, chunk.index, chunk.layers,
                                                chunk.remote_runs, peer.read_heads))
        failure = None
        with self._cond:
            if not handle.active or not peer.alive:
                self._landings.give(landing)
                return
            peer.verifying[key] = (handle, chunk, landing, ours, nbytes)
            try:
                self._agent.send_notif(peer.nixl_name, ask)
            except Exception as exc:  # noqa: BLE001 - this request's, not the link's
                self._landings.give(peer.verifying.pop(key)[2])
                failure = PeerUnreachable(f"NIXL could not ask {peer.name!r} for a "
                                          f"checksum: {exc}")
        if failure is not None:
            handle.fail(failure)

    def _on_answer(self, sender: str, raw: bytes, events: list[tuple]) -> None:
        frame = decode_detached(raw[len(ANSWER):])
        peers = [p for p in self._peers if p.nixl_name == sender and p.alive]
        if isinstance(frame, Completion):
            for p in peers:
                p.introduced.set()
            return
        if not isinstance(frame, (Data, Error)):
            raise RemoteProtocolError(f"a checksum answer cannot be {type(frame).__name__}")
        key = (frame.request_id, frame.chunk)
        for p in peers:
            entry = p.verifying.pop(key, None)
            if entry is not None:
                events.append((self._verdict, p, frame, *entry))
                return
        log.debug("a checksum answer from %r for %s matches no read waiting", sender, key)

    def _verdict(self, peer: NixlPeer, frame: Frame, handle: TransferHandle, chunk: Chunk,
                 landing: Landing, ours: int, nbytes: int) -> None:
        """Place the chunk if the owner's sum matches ours, else fail it. Unlocked."""
        what = f"chunk {chunk.index} of read #{handle.request_id} from {peer.name!r}"
        if isinstance(frame, Data) and frame.enc is not None and \
                frame.enc.raw_len == nbytes and frame.enc.checksum == ours:
            with self._cond:
                self.verified_chunks += 1
            self._land(peer, handle, chunk, landing)
            return
        with self._cond:
            self._landings.give(landing)
        if isinstance(frame, Error):
            cause: Exception = RemoteError(f"{peer.name!r} refused to hash {what}: "
                                           f"{frame.message}", frame.code)
        elif frame.enc is None or frame.enc.checksum is None or frame.enc.raw_len != nbytes:
            cause = RemoteProtocolError(f"{peer.name!r} answered for {what} without a sum "
                                        f"of its {nbytes} bytes")
        else:
            cause = ChecksumMismatch(
                f"checksum mismatch: {what} landed with xxh3-64 {ours:016x}, the owner's "
                f"blocks hash to {frame.enc.checksum:016x} (bytes changed on the way, or "
                "the owner's blocks changed under the read); nothing of it was placed")
        handle.fail(TransferFailed(f"{what} failed verification: {cause}", peer=peer.name,
                                   request_id=handle.request_id, cause=cause))

    def _drop_verifying(self, peer: NixlPeer, mine: Callable[[Key], bool]) -> None:
        """Give back the landing buffers of reads waiting for a sum. Locked."""
        for key in [k for k in peer.verifying if mine(k)]:
            self._landings.give(peer.verifying.pop(key)[2])

    # ---------------------------------------------------------- writer side
    def _source_sum(self, peer: NixlPeer, handle: TransferHandle, chunk: Chunk) -> int:
        """xxh3-64 of a write chunk's source blocks, as the receiver will hold them."""
        assert self._memory is not None
        return blocks_checksum(self._memory, chunk.layers, chunk.local_runs, peer.local_heads)

    def _send_sum(self, peer: NixlPeer, handle: TransferHandle, chunk: Chunk,
                  value: int) -> None:
        """Tell the receiver what a DONE write chunk should hold. Locked; raises what
        NIXL raises."""
        assert self._memory is not None
        key = getattr(handle, "key", None)
        note = b"" if key is None else encode_note(Note(NOTE_LAYERS, key, chunk.layers))
        nbytes = len(chunk.layers) * self._memory.num_parts * peer.pieces * \
            chunk.num_blocks * peer.piece_bytes
        frame = Write(handle.request_id, chunk.index, chunk.layers, chunk.remote_runs, nbytes,
                      notify=note, heads=peer.remote_heads,
                      enc=Encoding(raw_len=nbytes, checksum=value))
        self._agent.send_notif(peer.nixl_name, SUM + encode_detached(frame))

    # ---------------------------------------------------------- owner / receiver
    def _on_intro(self, sender: str, raw: bytes) -> None:
        """Load a reader's NIXL metadata (a reply link) and acknowledge. Locked."""
        md = decode_intro(raw, self.config.secret, sender)
        # A peer of ours under that name: its connection carries the answers.
        if not any(p.nixl_name == sender and p.alive for p in self._peers):
            if self._replies.get(sender) != md:
                if self._replies.pop(sender, None) is not None:  # a restarted reader
                    self._remove_remote(sender)
                name = self._agent.add_remote_agent(md)
                name = name.decode() if isinstance(name, bytes) else name
                if name != sender:
                    self._remove_remote(name)
                    raise RemoteProtocolError(f"{sender!r} introduced itself with the NIXL "
                                              f"metadata of {name!r}")
                self._replies[sender] = md
                while len(self._replies) > self.config.max_connections:
                    old, _ = self._replies.popitem(last=False)
                    self._remove_remote(old)
            self._replies.move_to_end(sender)
        self._agent.send_notif(sender, ANSWER + encode_detached(Completion(0, 0)))

    def _answer_ask(self, sender: str, raw: bytes) -> None:
        """Hash the blocks a reader asks about and answer. Unlocked."""
        assert self._memory is not None
        reply = ANSWER + encode_detached(answer(self._memory, raw[len(ASK):]))
        with self._cond:
            if self._agent is None:
                return
            try:
                self._agent.send_notif(sender, reply)
            except Exception as exc:  # noqa: BLE001 - it never introduced itself
                log.warning("cannot answer a checksum request of %r (did it connect with "
                            "checksums?): %s", sender, exc)

    def _check_sum(self, sender: str, raw: bytes) -> None:
        """Compare a written chunk's blocks with the writer's sum. Unlocked."""
        assert self._memory is not None
        try:
            w = decode_detached(raw[len(SUM):])
            if not isinstance(w, Write) or w.enc is None or w.enc.checksum is None:
                raise RemoteProtocolError("a write's checksum note without a sum")
            key = decode_note(w.notify).key if w.notify else None
            hook = self.sum_hook
            if hook is not None:
                hook(w)
            ours = blocks_checksum(self._memory, w.layers, w.runs, w.heads)
        except (ProtocolError, BlockOutOfRange) as exc:
            log.warning("dropping a malformed checksum note from %r: %s", sender, exc)
            return
        if ours == w.enc.checksum:
            with self._cond:
                self.checked_writes += 1
            return
        with self._cond:
            self.corrupt_writes += 1
        exc = ChecksumMismatch(
            f"checksum mismatch: chunk {w.chunk} of write #{w.request_id} from {sender!r} "
            f"(layers {list(w.layers)}, blocks {list(w.runs)}) landed with xxh3-64 "
            f"{ours:016x}, the writer sent {w.enc.checksum:016x}; those blocks are wrong")
        log.error("%s", exc)
        sink = self.on_corrupt
        if sink is not None:
            sink(sender, key, exc)

    def _on_checksum_note(self, sender: str, raw: bytes, events: list[tuple]) -> None:
        """Route one checksum notification. Locked (poll thread)."""
        try:
            if raw.startswith(INTRO):
                self._on_intro(sender, raw)
            elif raw.startswith(ASK):
                events.append((self._answer_ask, sender, raw))
            elif raw.startswith(ANSWER):
                self._on_answer(sender, raw, events)
            else:
                events.append((self._check_sum, sender, raw))
        except (ProtocolError, AuthenticationFailed) as exc:
            log.warning("dropping a checksum notification from %r: %s", sender, exc)
        except Exception as exc:  # noqa: BLE001 - NIXL's own errors
            log.warning("a checksum notification from %r failed: %s", sender, exc)

    def _forget_replies(self) -> None:
        """Drop every reply link (close). Locked."""
        for name in list(self._replies):
            self._remove_remote(name)
        self._replies.clear()
