"""One real vLLM engine in its own process, driven by JSON lines on stdin.

    python engine_proc.py MODEL [--connector ROLE] [--extra JSON] [--policy recompute|fail]

Commands (one JSON object a line); each answers one ``RESULT <json>`` line on stdout:
  {"op": "generate", "prompts": [[ids]], "max_tokens": N, "params": [dict|null],
   "abort_after_s": null|float}  -> [{"id", "tokens", "kv_transfer_params",
                                      "finish_reason"}]
      Greedy. With abort_after_s, every request still running then is aborted.
  {"op": "exit"}

The engine runs with vLLM's own engine-core process (V1 multiprocessing), so the
scheduler and the worker (with their connector halves) run exactly as in a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--connector", choices=["kv_producer", "kv_consumer", "kv_both"])
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--policy", default="fail")
    ap.add_argument("--block-size", type=int, default=32)
    a = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    kv = None
    if a.connector:
        kv = KVTransferConfig(kv_connector="KvxferConnector",
                              kv_connector_module_path="kvxfer.integrations.vllm",
                              kv_role=a.connector, kv_load_failure_policy=a.policy,
                              kv_connector_extra_config=json.loads(a.extra))
    args = EngineArgs(model=a.model, dtype="float32", block_size=a.block_size,
                      max_model_len=2048, max_num_seqs=8, enforce_eager=True,
                      enable_prefix_caching=False, kv_transfer_config=kv, seed=0)
    engine = LLMEngine.from_engine_args(args)
    print("READY", flush=True)
    counter = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        assert cmd["op"] == "generate", cmd
        ids = []
        for prompt, params in zip(cmd["prompts"], cmd["params"]):
            counter += 1
            rid = f"req-{counter}"
            sp = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True,
                                extra_args={"kv_transfer_params": params} if params else None)
            engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
            ids.append(rid)
        done: dict[str, dict] = {}
        abort_at = None if cmd.get("abort_after_s") is None else \
            time.monotonic() + cmd["abort_after_s"]
        while len(done) < len(ids):
            if abort_at is not None and time.monotonic() >= abort_at:
                engine.abort_request([r for r in ids if r not in done])
                for r in ids:
                    done.setdefault(r, {"id": r, "tokens": None, "kv_transfer_params": None,
                                        "finish_reason": "aborted"})
                break
            for out in engine.step():
                if out.finished:
                    c = out.outputs[0]
                    done[out.request_id] = {"id": out.request_id, "tokens": list(c.token_ids),
                                            "kv_transfer_params": out.kv_transfer_params,
                                            "finish_reason": c.finish_reason}
            if not engine.has_unfinished_requests():
                time.sleep(0.01)
        print("RESULT " + json.dumps([done[r] for r in ids]), flush=True)
    print("BYE", flush=True)


if __name__ == "__main__":
    main()
