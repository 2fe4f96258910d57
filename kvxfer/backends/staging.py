"""Staging: a reusable contiguous buffer that packed chunks pass through.

Chunks are packed into it before a send and unpacked from it after a receive when the
KV cache is on a GPU, when a transport moves one buffer per frame (UCX), or when a
chunk's blocks are too scattered for scatter-gather I/O to pay. It grows to the
largest chunk it has carried, never past the protocol's chunk limit (the receiver
refuses larger frames before anything is allocated), and ``release`` frees it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..memory import RegisteredMemory
from ..plan import MAX_CHUNK_BYTES


class Staging:
    """A reusable contiguous buffer for packed chunks, grown on demand.

    Args:
        memory: the registered memory whose chunks are packed.
        device: where the buffer lives; None for the memory's host staging buffer
            (pinned when the KV cache is on a GPU).
    """

    def __init__(self, memory: RegisteredMemory, device: Optional[torch.device] = None) -> None:
        self.memory = memory
        self.device = device
        self.tensor: Optional[torch.Tensor] = None

    def get(self, nbytes: int) -> tuple[torch.Tensor, object]:
        """(tensor, buffer for the transport) of at least ``nbytes``."""
        if nbytes > MAX_CHUNK_BYTES:
            raise ValueError(f"a chunk of {nbytes} bytes exceeds the limit {MAX_CHUNK_BYTES}")
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.tensor = None  # free the old buffer before taking a larger one
            self.tensor = (self.memory.staging_buffer(nbytes) if self.device is None
                           else torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        if self.tensor.device.type == "cpu":
            return self.tensor, memoryview(self.tensor.numpy()).cast("B")[:nbytes]
        return self.tensor, self.tensor[:nbytes]

    def release(self) -> None:
        """Free the buffer (pinned memory goes back at once); ``get`` makes a new one."""
        self.tensor = None
