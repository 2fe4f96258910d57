"""Landing buffers for NIXL reads: the peer's bytes land here, never straight in KV.

Theory of operation
-------------------
A NIXL READ is carried out by UCX with no call of ours in progress, and nothing in
NIXL 1.5 stops one that was posted: releasing its handle or removing the remote agent
leaves UCX's request running, and once a link that was down comes back (or a stopped
peer resumes) its bytes are written where the read pointed (measured: all 32 MiB of a
read released and removed while its peer was stopped landed after it resumed). Dropping
the whole NIXL agent does stop it, but aborts the peer process (UCX "Endpoint timeout"
fatal) and every other peer's transfers with it.

So a read points UCX at a private landing buffer, and the chunk's blocks are filled
from it by us, under the handle's ``data_lock`` while the handle is active, the same
rule the two-sided backends follow (:mod:`kvxfer.handle`). Once ``fail`` or ``cancel``
has returned, nothing writes the transfer's blocks, whatever UCX still does::

    post READ  -> landing buffer (packed chunk order) <- UCX writes, maybe late
    DONE       -> under data_lock, if active: memory.unpack_from(landing) -> chunk_done
    settled    -> buffer back to the pool;  broken unsettled -> quarantined for good

A buffer is one registered, prepared descriptor list of ``slots`` equal pieces (a
block; a block's piece of the shared heads for a peer of another TP shard; or, when
such pieces are small, the peer's whole block, over-read: see
:mod:`.nixl_descriptors`); a chunk's NIXL indices map onto it in the order
:meth:`RegisteredMemory.unpack_from` (``unpack_picked`` for an over-read) reads a
packed chunk (layer, part, block, piece). Buffers are kept for reuse, at most
one per chunk in flight; one whose read was broken off unsettled may still be written
by UCX, so it is never reused or freed (kept referenced for the process's life).

The cost is one local copy per chunk (a memcpy on host memory, the packing kernel on
a GPU), which the poll thread makes while later chunks are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from ..logs import get_logger

log = get_logger("kvxfer.nixl")

# Landing buffers abandoned with a read still posted into them: UCX may write them at
# any time, so they stay allocated and registered until the process ends.
_QUARANTINED: list["Landing"] = []


@dataclass(eq=False)
class Landing:
    tensor: torch.Tensor  # uint8, slots * piece bytes, on the KV cache's device
    reg: Any  # NIXL registration of the tensor
    dlist: Any  # prepared list: one descriptor per slot
    piece: int  # bytes per slot
    slots: int


def landing_order(groups: int, pieces: int, blocks: int) -> np.ndarray:
    """Landing slot of each of a chunk's NIXL indices.

    :func:`~.nixl_descriptors.chunk_indices` lists a chunk's pieces as (group, piece,
    block) with groups = layer x part; a packed chunk holds them as (group, block,
    piece). Slot of the i-th index: ``(g * blocks + k) * pieces + s``."""
    g = np.arange(groups, dtype=np.int64)[:, None, None]
    s = np.arange(pieces, dtype=np.int64)[None, :, None]
    k = np.arange(blocks, dtype=np.int64)[None, None, :]
    return ((g * blocks + k) * pieces + s).ravel().astype(np.int32)


class LandingPool:
    """Landing buffers of one NIXL agent, registered once and reused. Not thread-safe:
    the backend calls it under its lock."""

    def __init__(self, agent: Any, mem_type: str, device: int, torch_device: torch.device,
                 chunk_bytes: int) -> None:
        self._agent, self._mem_type, self._device = agent, mem_type, device
        self._torch_device, self._chunk_bytes = torch_device, chunk_bytes
        self._free: list[Landing] = []
        self.in_use = 0

    def take(self, piece: int, slots: int) -> Landing:
        """A buffer of at least ``slots`` pieces of ``piece`` bytes (made if none is free).

        Raises:
            whatever NIXL raises when registering or preparing (the caller fails the
            request that needed it).
        """
        fits = [b for b in self._free if b.piece == piece and b.slots >= slots]
        if fits:
            best = min(fits, key=lambda b: b.slots)
            self._free.remove(best)
            self.in_use += 1
            return best
        slots = max(slots, self._chunk_bytes // piece)
        tensor = torch.empty(slots * piece, dtype=torch.uint8, device=self._torch_device)
        reg = self._agent.register_memory([(tensor.data_ptr(), tensor.nbytes, self._device, "")],
                                          self._mem_type)
        try:
            rows = np.asarray([[tensor.data_ptr(), piece, self._device, piece, slots]],
                              dtype=np.uint64)
            dlist = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows, self._mem_type)
        except Exception:
            self._agent.deregister_memory(reg)
            raise
        self.in_use += 1
        return Landing(tensor, reg, dlist, piece, slots)

    def give(self, landing: Landing) -> None:
        """Back to the pool: nothing posted can write it any more."""
        self.in_use -= 1
        self._free.append(landing)

    def quarantine(self, landing: Landing) -> None:
        """A read into it was released unsettled: UCX may still write it. Never reused."""
        self.in_use -= 1
        _QUARANTINED.append(landing)
        log.warning("a NIXL read was abandoned unsettled; its %d-byte landing buffer is "
                    "kept aside for good (%d so far), the KV cache is not touched",
                    landing.tensor.nbytes, len(_QUARANTINED))

    def close(self) -> Optional[str]:
        """Free every buffer in the pool; returns a problem to log, or None."""
        problem = None
        for landing in self._free:
            try:
                landing.dlist.release()
                self._agent.deregister_memory(landing.reg)
            except Exception as exc:  # noqa: BLE001 - closing goes on
                problem = f"freeing a NIXL landing buffer: {exc}"
        self._free.clear()
        return problem
