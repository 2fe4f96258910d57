"""KV-aware routing: pick the worker whose cached prefix and load make a request cheapest.

The cost of sending a request of ``n`` blocks to worker ``w`` is counted in blocks of
prefill work::

    cost(w) = n - sum(credit[tier] for each leading block w holds, at its best tier)
              + load_weight * load(w)

A block held on the GPU saves its whole prefill (credit 1.0); one on CPU, disk or a
remote store saves less, because it must first be pulled. ``load`` is whatever the
caller measures (queued tokens / block size, running requests, ...) in the same units
``load_weight`` converts to blocks.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from kvxfer.prefix.index import PrefixIndex
from kvxfer.prefix.keys import BlockHashes, as_keys
from kvxfer.prefix.locations import TIERS, Overlap


def _default_credit() -> dict[str, float]:
    return {"gpu": 1.0, "cpu": 0.8, "disk": 0.5, "remote": 0.3}


@dataclass(slots=True)
class RoutingConfig:
    """Weights of the routing cost; read by :func:`route`, changed only by its owner."""

    # Share of a block's prefill saved when the worker holds it on each tier (0..1).
    tier_credit: dict[str, float] = field(default_factory=_default_credit)
    # Blocks of prefill one unit of load is worth.
    load_weight: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The chosen worker and why."""

    # The worker with the lowest cost (ties: lower load, then the loads' order).
    worker: Hashable
    # Its cost in blocks, and the blocks it must still prefill (weighted by tier).
    cost: float
    prefill_blocks: float
    # Its overlap with the request (zero blocks when it holds none).
    overlap: Overlap
    # Every candidate's cost.
    costs: dict[Hashable, float]


def route(index: PrefixIndex, block_hashes: BlockHashes, loads: Mapping[Hashable, float],
          config: RoutingConfig | None = None, group: int = 0) -> RouteDecision:
    """Choose among ``loads``' workers the cheapest one for this request.

    Args:
        index: the prefix index.
        block_hashes: the request's block hashes.
        loads: candidate worker -> current load; only these workers are considered.
        config: credits and load weight; defaults to :class:`RoutingConfig`.
        group: the KV-cache group whose cached blocks count.

    Returns:
        The decision.

    Raises:
        ValueError: no candidates, or a credit for an unknown tier.
    """
    if not loads:
        raise ValueError("route() needs at least one candidate worker in loads")
    cfg = config or RoutingConfig()
    unknown = set(cfg.tier_credit) - set(TIERS)
    if unknown:
        raise ValueError(f"credits for unknown tiers {sorted(unknown)}")
    keys = as_keys(block_hashes)
    n = int(keys.shape[0])
    overlaps = index.overlap(keys, group)
    costs: dict[Hashable, float] = {}
    best: tuple[float, float, int] | None = None
    chosen: Hashable = None
    for order, (worker, load) in enumerate(loads.items()):
        ov = overlaps.get(worker)
        saved = 0.0 if ov is None else sum(cfg.tier_credit.get(t, 0.0) * c
                                           for t, c in ov.by_tier.items())
        cost = n - saved + cfg.load_weight * float(load)
        costs[worker] = cost
        rank = (cost, float(load), order)
        if best is None or rank < best:
            best, chosen = rank, worker
    assert best is not None
    ov = overlaps.get(chosen) or Overlap(chosen, 0, {t: 0 for t in TIERS})
    prefill = best[0] - cfg.load_weight * best[1]
    return RouteDecision(chosen, best[0], prefill, ov, costs)


__all__ = ["RouteDecision", "RoutingConfig", "route"]
