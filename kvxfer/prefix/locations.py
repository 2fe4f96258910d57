"""What the prefix index answers with: tiers, block locations and overlap scores."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

#: Storage tiers, fastest first. A tier's position is its rank in masks and credits.
TIERS: tuple[str, ...] = ("gpu", "cpu", "disk", "remote")
TIER_INDEX: dict[str, int] = {name: i for i, name in enumerate(TIERS)}

#: vLLM event "medium" strings (lower-cased) -> tier. None means the GPU.
MEDIUM_TIERS: dict[str, str] = {
    "gpu": "gpu", "cuda": "gpu", "hbm": "gpu",
    "cpu": "cpu", "host": "cpu", "cpu_pinned": "cpu", "dram": "cpu",
    "disk": "disk", "local_disk": "disk", "ssd": "disk", "nvme": "disk", "file": "disk",
    "storage": "disk",  # vLLM's MEDIUM_STORAGE: its offloading connectors' local storage
    "remote": "remote", "network": "remote", "object_store": "remote",
}


def tier_index(tier: str) -> int:
    """Rank of a tier name.

    Raises:
        ValueError: not one of :data:`TIERS`.
    """
    try:
        return TIER_INDEX[tier]
    except KeyError:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}") from None


@dataclass(frozen=True, slots=True)
class Location:
    """One place a block's KV lives."""

    # The worker that holds it (any hashable id the caller chose).
    worker: Hashable
    # Tier name, one of TIERS.
    tier: str
    # The worker's block id, when the storer told us; None otherwise.
    block_id: int | None = None


@dataclass(frozen=True, slots=True)
class Overlap:
    """How much of a request's prefix one worker holds, split by tier."""

    # The worker.
    worker: Hashable
    # Leading blocks of the request the worker holds on some tier.
    blocks: int
    # Of those, how many are held (at best) on each tier, keyed by tier name.
    by_tier: dict[str, int]


__all__ = ["Location", "MEDIUM_TIERS", "Overlap", "TIERS", "TIER_INDEX", "tier_index"]
