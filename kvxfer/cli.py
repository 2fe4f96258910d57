"""The ``kvxfer`` command line.

    kvxfer info [--json]    every registered backend, whether it is usable here, and why not

Subcommands are argparse subparsers, each a ``_cmd_<name>(args) -> int`` function, so
``bench`` and ``serve`` slot in beside ``info``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Optional, Sequence

from .backends import get_backend, registered_backends
from .errors import BackendUnavailable


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool  # its library imports here
    cuda: bool  # it can move CUDA memory here (a CUDA device is visible)
    library: str  # the distributions behind it, with versions
    notes: str  # why not, or what holds


def _extra_requirements(extra: Optional[str]) -> list[str]:
    """Distribution names the pip extra ``extra`` of kvxfer installs."""
    if extra is None:
        return []
    try:
        requires = metadata.requires("kvxfer") or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for req in requires:
        if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", req):
            names.append(re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0])
    return names


def _versions(dists: list[str]) -> str:
    out = []
    for dist in dists:
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out) or "built in"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def backend_info(name: str, extra: Optional[str], cuda: bool) -> BackendInfo:
    """Probe one registered backend: import its class (and library) and report."""
    library = _versions(_extra_requirements(extra))
    try:
        cls = get_backend(name)
    except BackendUnavailable as exc:
        return BackendInfo(name, False, False, library, exc.reason + (
            f"; install: pip install 'kvxfer[{extra}]'" if extra else ""))
    except Exception as exc:  # noqa: BLE001 - a broken third-party backend is reported
        return BackendInfo(name, False, False, library, f"import failed: {exc!r}")
    describe = getattr(cls, "describe", None)  # a backend may say more of its state here
    notes = describe(cuda) if callable(describe) else \
        "host and CUDA memory" if cuda else "host memory only: no CUDA device here"
    return BackendInfo(name, True, cuda, library, notes)


def _cmd_info(args: argparse.Namespace) -> int:
    cuda = _cuda_available()
    infos = [backend_info(name, extra, cuda)
             for name, (_, extra) in registered_backends().items()]
    if args.json:
        print(json.dumps({"python": platform.python_version(), "cuda": cuda,
                          "backends": [asdict(i) for i in infos]}, indent=2))
        return 0
    try:
        version = metadata.version("kvxfer")
    except metadata.PackageNotFoundError:
        version = "?"
    print(f"kvxfer {version} on Python {platform.python_version()}, "
          f"CUDA device: {'yes' if cuda else 'no'}")
    width = max([len("backend")] + [len(i.name) for i in infos])
    print(f"{'backend':<{width}}  usable  {'library':<24}  notes")
    for i in infos:
        print(f"{i.name:<{width}}  {'yes' if i.usable else 'no':<6}  {i.library:<24}  {i.notes}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvxfer", description="Move paged KV-cache blocks "
                                     "between LLM-serving processes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="list the backends and whether each is usable here")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``kvxfer`` console script.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
