"""Start engine_proc.py engines as separate processes and talk to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # the repository
START_TIMEOUT = 1200  # engines start in ~20 s alone, minutes on a loaded 2-core machine


class Engine:
    """A vLLM engine in its own process (see engine_proc.py); logs kept in ``self.log``."""

    def __init__(self, model: str, role: Optional[str] = None, extra: Optional[dict] = None,
                 policy: str = "fail") -> None:
        cmd = [sys.executable, os.path.join(HERE, "engine_proc.py"), model]
        if role:
            cmd += ["--connector", role, "--extra", json.dumps(extra or {}), "--policy", policy]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   VLLM_LOGGING_LEVEL="INFO")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        self._results: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_line("READY", START_TIMEOUT)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.log.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.log.append("<exited>")
            self._cond.notify_all()

    def _wait_line(self, prefix: str, timeout: float, start: int = 0) -> str:
        with self._cond:
            i = start
            ok = self._cond.wait_for(lambda: any(
                l.startswith(prefix) or l == "<exited>" for l in self.log[i:]), timeout)
            hits = [l for l in self.log[i:] if l.startswith(prefix) or l == "<exited>"]
        if not ok or hits[0] == "<exited>":
            raise RuntimeError(f"engine gave no {prefix!r} in {timeout} s; log tail:\n" +
                               "\n".join(self.log[-40:]))
        return hits[0]

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 params: Optional[list[Optional[dict]]] = None,
                 abort_after_s: Optional[float] = None, timeout: float = 300) -> list[dict]:
        with self._cond:
            start = len(self.log)
        cmd = {"op": "generate", "prompts": prompts, "max_tokens": max_tokens,
               "params": params or [None] * len(prompts), "abort_after_s": abort_after_s}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self._wait_line("RESULT ", timeout, start)
        return json.loads(line[len("RESULT "):])

    def grep(self, text: str) -> list[str]:
        with self._cond:
            return [l for l in self.log if text in l]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait(30)


def prefill_params() -> dict[str, Any]:
    return {"do_remote_decode": True}
