"""KvxferConnector: vLLM's disaggregated prefill/decode over kvxfer.

Load it with::

    --kv-transfer-config '{"kv_connector": "KvxferConnector",
                           "kv_connector_module_path": "kvxfer.integrations.vllm",
                           "kv_role": "kv_both"}'

vLLM is imported here only; ``import kvxfer`` never imports this module.

Theory of operation (pull mode, the flow of vLLM's NixlConnector and its proxy)
-----------------------------------------------------------------------------
::

    proxy ── prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": true} ──> prefill
    prefill scheduler: request_finished -> hold the blocks (delay free), answer
        {"do_remote_prefill": true, "remote_block_ids": [...], "remote_request_id": R,
         "kvxfer_agent": <hex of the prefill worker agent's metadata()>, ...}
    proxy ── prompt, kv_transfer_params=<that> ─────────────────────────────────────> decode
    decode scheduler: get_num_new_matched_tokens -> (prompt tokens, async);
        update_state_after_alloc -> a pull (remote blocks -> the blocks vLLM allocated)
    decode worker: start_load_kv -> Handover.pull (Agent.read); get_finished reports it
        loaded once prefill acked the read (the fence, see handover.py), or reports its
        blocks through get_block_ids_with_load_errors (vLLM's kv_load_failure_policy
        then recomputes or fails the request)
    prefill worker: get_finished hands the blocks back to vLLM once read, aborted by
        decode, or when the lease (kv_lease_duration, renewed by decode's heartbeats)
        runs out.

The scheduler half learns its worker's agent metadata through vLLM's handshake hooks
(get_handshake_metadata -> set_xfer_handshake_metadata) and ships it inside
kv_transfer_params, so no side channel is needed: the proxy forwards it untouched.

Extra config (kv_connector_extra_config): ``backend`` ("tcp"), ``listen``
("127.0.0.1:0"; the host decode reaches prefill at), ``kv_lease_duration`` (30 s),
``ack_timeout`` (10 s), ``scramble_loaded_kv`` (test knob, negative control: rotate
every pull's landed blocks; per request, ``"kvxfer_debug_scramble": true`` in the
decode request's kv_transfer_params does the same).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorHandshakeMetadata, KVConnectorMetadata, KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

from ..agent import Agent
from ..logs import get_logger
from .handover import Handover
from .vllm_layout import layout_from_vllm

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = get_logger("kvxfer.vllm")

__all__ = ["KvxferConnector", "KvxferConnectorMetadata", "KvxferStats"]


@dataclass
class KvxferHandshake(KVConnectorHandshakeMetadata):
    """What a worker tells its scheduler: its agent's metadata() bytes."""

    agent: bytes


@dataclass
class KvxferConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once a step. Built by build_connector_meta only."""

    # decode: request id -> (prefill agent hex, prefill request id, remote blocks, local
    # blocks, scramble: the negative-control test knob)
    pulls: dict[str, tuple[str, str, list[int], list[int], bool]] = field(
        default_factory=dict)
    holds: list[str] = field(default_factory=list)  # prefill: requests to lease
    aborts: list[tuple[str, str]] = field(default_factory=list)  # decode: (agent, remote id)
    heartbeats: dict[str, list[str]] = field(default_factory=dict)  # agent -> remote ids


@dataclass
class KvxferStats(KVConnectorStats):
    """Transfer stats, worker -> logger: counts, bytes, latencies, failures by cause."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"transfers": 0, "bytes": 0, "latency_s": [], "failures": {},
                     "released": {}}

    def aggregate(self, other: KVConnectorStats) -> "KvxferStats":
        o = other.data
        self.data["transfers"] += o.get("transfers", 0)
        self.data["bytes"] += o.get("bytes", 0)
        self.data["latency_s"] = self.data["latency_s"] + list(o.get("latency_s", []))
        for k in ("failures", "released"):
            for cause, n in o.get(k, {}).items():
                self.data[k][cause] = self.data[k].get(cause, 0) + n
        return self

    def reduce(self) -> dict[str, int | float]:
        lat = sorted(self.data["latency_s"])
        out: dict[str, int | float] = {"transfers": self.data["transfers"],
                                       "bytes": self.data["bytes"]}
        if lat:
            out["median_latency_ms"] = round(lat[len(lat) // 2] * 1e3, 3)
        for cause, n in self.data["failures"].items():
            out[f"failures_{cause}"] = n
        return out

    def is_empty(self) -> bool:
        d = self.data
        return not (d["transfers"] or d["failures"] or d["released"])


class KvxferPromMetrics(KVConnectorPromMetrics):
    """kvxfer:kv_transfer_latency_seconds, kvxfer:kv_transfer_bytes_total,
    kvxfer:kv_transfer_failures_total{cause}, kvxfer:kv_blocks_released_total{reason}."""

    def __init__(self, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labels = per_engine_labelvalues
        self.latency = self._histogram_cls(
            name="kvxfer:kv_transfer_latency_seconds", labelnames=labelnames,
            documentation="Seconds from a decode pull's start to its read completing.",
            buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
        self.bytes = self._counter_cls(name="kvxfer:kv_transfer_bytes_total",
                                       documentation="KV bytes pulled by decode.",
                                       labelnames=labelnames)
        self.failures = self._counter_cls(name="kvxfer:kv_transfer_failures_total",
                                          documentation="Failed KV loads, by cause.",
                                          labelnames=labelnames + ["cause"])
        self.released = self._counter_cls(name="kvxfer:kv_blocks_released_total",
                                          documentation="Prefill requests whose blocks "
                                          "were handed back, by reason.",
                                          labelnames=labelnames + ["reason"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(x) for x in self._labels.get(engine_idx, [])]
        for s in transfer_stats_data.get("latency_s", []):
            self.latency.labels(*labels).observe(s)
        self.bytes.labels(*labels).inc(transfer_stats_data.get("bytes", 0))
        for cause, n in transfer_stats_data.get("failures", {}).items():
            self.failures.labels(*labels, cause).inc(n)
        for reason, n in transfer_stats_data.get("released", {}).items():
            self.released.labels(*labels, reason).inc(n)


def _log_like_vllm() -> None:
    """Send kvxfer's log records where vLLM sends its own (its handlers, INFO)."""
    ours, theirs = logging.getLogger("kvxfer"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for h in theirs.handlers:
            ours.addHandler(h)
        ours.setLevel(logging.INFO)


class KvxferConnector(KVConnectorBase_V1):
    """A vLLM KV connector whose transfers are kvxfer Agent reads (see module doc)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _log_like_vllm()
        cfg = self._kv_transfer_config
        self._extra = dict(cfg.kv_connector_extra_config or {})
        self._engine_id = str(cfg.engine_id)
        self._lease_s = float(self._extra.get("kv_lease_duration", 30))
        self._scramble = bool(self._extra.get("scramble_loaded_kv"))
        # scheduler half
        self._agent_hex: Optional[str] = None  # our worker's agent metadata (hex)
        self._pulls: dict[str, tuple[str, str, list[int], list[int], bool]] = {}
        self._holds: list[str] = []
        self._aborts: list[tuple[str, str]] = []
        self._waiting: dict[str, tuple[str, str]] = {}  # decode req -> (agent, remote id)
        self._last_heartbeat = 0.0
        # worker half
        self._agent: Optional[Agent] = None
        self._handover: Optional[Handover] = None
        self._pulling: dict[str, list[int]] = {}  # decode req -> local blocks
        self._load_errors: set[int] = set()

    # =========================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = layout_from_vllm(kv_caches)
        name = f"vllm-{self._engine_id[:8]}-{uuid.uuid4().hex[:8]}"
        self._agent = Agent(name, backend=self._extra.get("backend", "tcp"),
                            listen=self._extra.get("listen", "127.0.0.1:0"),
                            connect_timeout=float(self._extra.get("connect_timeout", 5)))
        self._agent.register_kv_cache(layout)
        self._handover = Handover(self._agent, lease_s=self._lease_s,
                                  ack_timeout_s=float(self._extra.get("ack_timeout", 10)))
        log.info("kvxfer: agent %s registered %r", name, layout)

    def get_handshake_metadata(self) -> Optional[KVConnectorHandshakeMetadata]:
        return None if self._agent is None else KvxferHandshake(self._agent.metadata())

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvxferConnectorMetadata) and self._handover is not None
        for req in meta.holds:
            self._handover.hold(req)
        for agent_hex, remote_req in meta.aborts:
            self._handover.abort_remote(bytes.fromhex(agent_hex), remote_req)
        for agent_hex, reqs in meta.heartbeats.items():
            self._handover.heartbeat(bytes.fromhex(agent_hex), reqs)
        for key, (agent_hex, remote_req, remote, local, scramble) in meta.pulls.items():
            n = min(len(remote), len(local))
            self._pulling[key] = local[:n]
            self._handover.pull(key, bytes.fromhex(agent_hex), remote_req, remote[-n:] if n
                                else [], local[:n], scramble=scramble)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # pull mode: a request runs only once its whole load finished

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # pull mode: decode reads the blocks after prefill finished

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        if self._handover is None:
            return set(), set()
        for req in finished_req_ids & set(self._pulling):
            self._handover.abort(req)  # decode dropped a request still loading
        done, failed = self._handover.take_results()
        for req, cause in failed.items():
            self._load_errors.update(self._pulling.get(req, []))
            log.warning("kvxfer: KV load of %s failed (%s); vLLM's kv_load_failure_policy "
                        "decides", req, cause)
        recving = done | set(failed)
        for req in recving:
            self._pulling.pop(req, None)
        return self._handover.take_released(), recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def get_kv_connector_stats(self) -> Optional[KvxferStats]:
        if self._handover is None:
            return None
        s = self._handover.take_stats()
        stats = KvxferStats({"transfers": s.transfers, "bytes": s.bytes,
                             "latency_s": s.latency_s, "failures": s.failures,
                             "released": s.released})
        return None if stats.is_empty() else stats

    def shutdown(self) -> None:
        if self._handover is not None:
            self._handover.close()
        if self._agent is not None:
            self._agent.close()

    # ======================================================== scheduler side
    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]
                                    ) -> None:
        if len(metadata) != 1:
            raise ValueError(f"KvxferConnector serves tensor-parallel size 1 only; got "
                             f"handshakes from ranks {sorted(metadata)}")
        (meta,) = metadata.values()
        assert isinstance(meta, KvxferHandshake), type(meta)
        self._agent_hex = meta.agent.hex()

    def on_new_request(self, request: "Request") -> None:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill") and params.get("kvxfer_agent"):
            self._waiting[request.request_id] = (params["kvxfer_agent"],
                                                 str(params["remote_request_id"]))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill") and params.get("kvxfer_agent"):
            count = min(int(params.get("remote_num_tokens") or request.num_prompt_tokens),
                        request.num_prompt_tokens) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or \
                not params.get("kvxfer_agent"):
            return
        params["do_remote_prefill"] = False  # one pull per request
        agent, remote_req = params["kvxfer_agent"], str(params["remote_request_id"])
        if num_external_tokens > 0:
            local = blocks.get_unhashed_block_ids_all_groups()[0]
            self._pulls[request.request_id] = (
                agent, remote_req, list(params["remote_block_ids"]), list(local),
                bool(params.get("kvxfer_debug_scramble")) or self._scramble)
        else:  # everything was cached here: free prefill's blocks now
            self._aborts.append((agent, remote_req))
        self._waiting.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput"
                             ) -> KvxferConnectorMetadata:
        meta = KvxferConnectorMetadata(pulls=self._pulls, holds=self._holds,
                                       aborts=self._aborts)
        now = time.monotonic()
        if self._waiting and now - self._last_heartbeat >= self._lease_s / 4:
            self._last_heartbeat = now
            for agent, remote in self._waiting.values():
                meta.heartbeats.setdefault(agent, []).append(remote)
        self._pulls, self._holds, self._aborts = {}, [], []
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, Optional[dict[str, Any]]]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        self._waiting.pop(request.request_id, None)
        if not params:
            return False, None
        if params.get("do_remote_prefill") and params.get("kvxfer_agent"):
            # decode dropped it before allocating: prefill must not keep the blocks
            self._aborts.append((params["kvxfer_agent"], str(params["remote_request_id"])))
            params["do_remote_prefill"] = False
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED) or not block_ids or \
                self._agent_hex is None:
            return False, None
        self._holds.append(request.request_id)
        host, _, port = (self._extra.get("listen") or "127.0.0.1:0").rpartition(":")
        return True, dict(do_remote_prefill=True, do_remote_decode=False,
                          remote_block_ids=list(block_ids), remote_engine_id=self._engine_id,
                          remote_request_id=request.request_id, remote_host=host,
                          remote_port=int(port or 0),
                          remote_num_tokens=request.num_computed_tokens,
                          kvxfer_agent=self._agent_hex)

    # ================================================================ stats
    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None
                                 ) -> Optional[KvxferStats]:
        return KvxferStats(data=dict(data)) if data is not None else KvxferStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict,
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KvxferPromMetrics:
        return KvxferPromMetrics(vllm_config, metric_types, labelnames,
                                 per_engine_labelvalues)
