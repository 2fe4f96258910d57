"""Two network namespaces joined by a veth pair, for tests that need two "nodes".

Needs root and iproute2. Everything made here is named with the caller's prefix and
removed on exit; traffic stays on the veth pair between the two namespaces.

A process can also move itself into a namespace (:func:`enter`), which lets a peer
started with ``multiprocessing`` live in one namespace while its parent lives in the
other: the Pipe between them is not a network socket and works across namespaces.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_REC, MS_SLAVE, MNT_DETACH = 0x4000, 0x80000, 2


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=10)


def usable() -> str | None:
    """None where namespaces can be made here; otherwise why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = f"kvxprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return None


def enter(name: str) -> None:
    """Move this process into namespace ``name``, as ``ip netns exec`` does; call it
    first thing in a new process, before it has other threads or any socket.

    Besides setns, it mounts a /sys of the new namespace in a mount namespace of its
    own: UCX finds its network devices in /sys/class/net, and with the old /sys it
    advertises the other namespace's devices (its peers then cannot reach it).
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what} (netns {name}): {os.strerror(err)}")

    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        check(libc.setns(fd, CLONE_NEWNET), "setns")
    finally:
        os.close(fd)
    check(libc.unshare(CLONE_NEWNS), "unshare")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    check(libc.umount2(b"/sys", MNT_DETACH), "umount /sys")
    check(libc.mount(name.encode(), b"/sys", b"sysfs", 0, None), "mount sysfs")


@dataclass(frozen=True)
class Link:
    """Namespace ``a`` (device ``va``, address ``addr_a``) <-> ``b`` (``vb``, ``addr_b``)."""

    a: str
    b: str
    va: str
    vb: str
    addr_a: str
    addr_b: str

    def __getitem__(self, key: str) -> str:  # link["a"], as the fixture's dict had it
        return getattr(self, key)

    def shape(self, ns: str, dev: str, *qdisc: str) -> None:
        """Replace the root qdisc of ``dev`` in ``ns`` (``tbf rate ...``)."""
        sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *qdisc)

    def shape_both(self, *qdisc: str) -> None:
        self.shape(self.a, self.va, *qdisc)
        self.shape(self.b, self.vb, *qdisc)

    def set_up(self, up: bool) -> None:
        sh("ip", "-n", self.a, "link", "set", self.va, "up" if up else "down")


@contextmanager
def two_namespaces(prefix: str, subnet: str = "10.213.7", rate: str = "200mbit",
                   burst: str = "256kb") -> Iterator[Link]:
    """Namespaces ``{prefix}a{pid}`` and ``{prefix}b{pid}``, veth ``subnet``.1 <-> .2,
    each way shaped by tbf at ``rate``; deleted on exit (with their devices)."""
    tag = f"{os.getpid() % 100000}"
    link = Link(f"{prefix}a{tag}", f"{prefix}b{tag}", f"{prefix}va{tag}", f"{prefix}vb{tag}",
                f"{subnet}.1", f"{subnet}.2")
    try:
        sh("ip", "netns", "add", link.a)
        sh("ip", "netns", "add", link.b)
        sh("ip", "link", "add", link.va, "type", "veth", "peer", "name", link.vb)
        sh("ip", "link", "set", link.va, "netns", link.a)
        sh("ip", "link", "set", link.vb, "netns", link.b)
        for ns, dev, ip in ((link.a, link.va, link.addr_a), (link.b, link.vb, link.addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        link.shape_both("tbf", "rate", rate, "burst", burst, "latency", "50ms")
        yield link
    finally:
        for ns in (link.a, link.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
