"""The ``kvxfer`` command line.

    kvxfer info [--json]    every registered backend, whether it is usable here, and why not
    kvxfer bench [options]  transfer latency / GB/s per backend against a local peer process
    kvxfer bench serve --listen HOST:PORT          the peer, on another machine
    kvxfer bench run --connect HOST:PORT [options] measure against that peer

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
from typing import TYPE_CHECKING, Optional, Sequence

from .backends import get_backend, registered_backends
from .errors import BackendUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from .bench import BenchConfig


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool  # its library imports here
    cuda: bool  # it can move CUDA memory here (a CUDA device is visible)
    library: str  # the distributions behind it, with versions
    notes: str  # why not, or what holds
    transport: str = ""  # what would carry the bytes on this host (kvxfer.transport)


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
    from .transport import expected
    return BackendInfo(name, True, cuda, library, notes, expected(name))


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
        carries = f"; transport here: {i.transport}" if i.transport else ""
        print(f"{i.name:<{width}}  {'yes' if i.usable else 'no':<6}  {i.library:<24}  "
              f"{i.notes}{carries}")
    return 0


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers like 1,4,16, got {text!r}")
    return values


def _add_bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", nargs="+", default=["tcp"], metavar="NAME",
                   help="one or several backends, measured in turn (default: tcp)")
    p.add_argument("--op", choices=["read", "write"], default="read")
    p.add_argument("--model", default="llama-3.1-8b",
                   help="KV geometry of a model in kv_shapes.json (default: llama-3.1-8b)")
    p.add_argument("--layers", type=int, help="explicit geometry: overrides --model")
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "fp8"])
    p.add_argument("--blocks", type=_int_list, default=[1, 4, 16, 64],
                   help="blocks per request, a sweep: 1,4,16,64 (default)")
    p.add_argument("--iters", type=int, default=50, help="measured requests per size")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests per size first")
    p.add_argument("--inflight", type=int, default=1, help="concurrent requests")
    p.add_argument("--compression", choices=["none"], default="none",
                   help="payload codec (none: kvxfer has no codec yet)")
    p.add_argument("--order", choices=["random", "contiguous"], default="random",
                   help="block ids of a request: random (as a real block table) or one run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-cache-gib", type=float, default=2.0,
                   help="largest KV cache either side may allocate")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON ('-': stdout)")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="draw GB/s and p99 against size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench_config(args: argparse.Namespace) -> "BenchConfig":
    from dataclasses import replace

    from .bench import BenchConfig, Geometry, models

    known = models()
    if args.model not in known:
        raise SystemExit(f"kvxfer bench: unknown model {args.model!r}; known: "
                         f"{', '.join(sorted(known))}")
    geo = known[args.model]
    explicit = {k: v for k, v in (("layers", args.layers), ("kv_heads", args.kv_heads),
                                  ("head_dim", args.head_dim), ("block_size", args.block_size),
                                  ("dtype", args.dtype)) if v is not None}
    if explicit:  # all three shape options: a custom geometry; fewer: the model's, changed
        custom = bool(args.layers and args.kv_heads and args.head_dim)
        base = Geometry("custom", 1, 1, 1) if custom else geo
        mla = 0 if "kv_heads" in explicit or "head_dim" in explicit else base.mla_latent_dim
        geo = replace(base, name="custom" if custom else f"{geo.name} (modified)",
                      mla_latent_dim=mla, **explicit)
    if args.device == "cuda" and not _cuda_available():
        raise SystemExit("kvxfer bench: --device cuda, but no CUDA device is visible")
    for n in ("iters", "inflight"):
        if getattr(args, n) < 1:
            raise SystemExit(f"kvxfer bench: --{n} must be at least 1")
    return BenchConfig(backends=list(dict.fromkeys(args.backend)), op=args.op, geometry=geo,
                       blocks=args.blocks, iters=args.iters, warmup=max(0, args.warmup),
                       inflight=args.inflight, order=args.order, device=args.device,
                       max_cache_bytes=int(args.max_cache_gib * (1 << 30)))


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, bench_report

    if getattr(args, "bench_mode", None) == "serve":
        return bench.serve(args.listen, once=args.once)
    config = _bench_config(args)
    for name in config.backends:  # fail before spawning anything
        try:
            get_backend(name)
        except BackendUnavailable as exc:
            print(f"kvxfer bench: {exc}", file=sys.stderr)
            return 1
    bar = None
    if not args.quiet and sys.stderr.isatty():  # quiet when not a terminal
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(config.backends) * len(config.blocks), unit="size",
                       leave=False)
        except ImportError:
            pass
    rows = []
    try:
        for row in bench.run(config, getattr(args, "connect", None),
                             bar.set_description if bar is not None else None):
            rows.append(row)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _write(args.json, bench_report.to_json(rows, config) + "\n")
    if args.csv:
        _write(args.csv, bench_report.to_csv(rows))
    if args.json != "-" and args.csv != "-":
        print(bench_report.table(rows, config), end="")
    if args.plot:
        bench_report.plot(rows, config, args.plot)
        if args.json != "-" and args.csv != "-":
            print(f"plot: {args.plot}")
    return 0 if all(r.checked for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvxfer", description="Move paged KV-cache blocks "
                                     "between LLM-serving processes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="list the backends and whether each is usable here")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser("bench", help="measure transfers per backend (local peer process "
                           "by default; serve / run for two machines)")
    _add_bench_options(bench)
    bench.set_defaults(func=_cmd_bench)
    modes = bench.add_subparsers(dest="bench_mode", metavar="MODE")
    serve = modes.add_parser("serve", help="be the peer: hold a KV cache for runners")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    serve.add_argument("--once", action="store_true", help="exit after one session")
    run = modes.add_parser("run", help="measure against a `kvxfer bench serve` peer")
    run.add_argument("--connect", required=True, metavar="HOST:PORT")
    _add_bench_options(run)
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
