"""Bare ucxx between two processes on this host: the ceiling for kvxfer's UCX backend.

    python benchmarks/bench_ucxx_stream.py [--size 32768 4194304] [--total-mib 128]

A server process sends ``total`` bytes as messages of ``size`` bytes over one endpoint
(error handling on, as kvxfer's), with every receive posted ahead on the client; both
the stream and the tag API, with UCX's shared-memory transports allowed to do error
handling (``MM_ERROR_HANDLING=y``, as kvxfer sets it). Prints the median GB/s of
--repeats transfers per (API, size). No kvxfer code runs: compare with
bench_transfer.py --backend ucx.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

OPTIONS = {"TLS": "^cuda", "MM_ERROR_HANDLING": "y"}


def _worker() -> tuple:
    import ucxx._lib.libucxx as ucx
    context = ucx.UCXContext(config_dict=OPTIONS, feature_flags=(
        ucx.Feature.TAG, ucx.Feature.STREAM, ucx.Feature.WAKEUP))
    worker = ucx.UCXWorker(context)
    worker.start_progress_thread(polling_mode=False, epoll_timeout=10)
    return ucx, worker


def _post_all(ucx: object, ep: object, api: str, view: memoryview, size: int,
              send: bool) -> None:
    from ucxx._lib.arr import Array
    requests = []
    for i in range(len(view) // size):
        buf = Array(view[i * size:(i + 1) * size])
        if api == "tag":
            tag = ucx.UCXXTag(i)
            requests.append(ep.tag_send(buf, tag) if send else ep.tag_recv(buf, tag))
        else:
            requests.append(ep.stream_send(buf) if send else ep.stream_recv(buf))
    for request in requests:
        while not request.completed:
            time.sleep(0)
        request.check_error()


def server(q: "mp.Queue", cases: list, total: int, repeats: int) -> None:
    ucx, worker = _worker()
    eps: list = []
    listener = ucx.UCXListener.create(
        worker, 0, lambda req: eps.append(listener.create_endpoint_from_conn_request(req, True)))
    q.put(listener.port)
    while not eps:
        time.sleep(0.001)
    view = memoryview(bytearray(total))
    for api, size in cases:
        for _ in range(repeats + 1):
            _post_all(ucx, eps[0], api, view, size, send=True)
    q.get()  # the client is done
    worker.stop_progress_thread()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[32768, 4 << 20])
    parser.add_argument("--total-mib", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    total = args.total_mib << 20
    cases = [(api, size) for api in ("stream", "tag") for size in args.size]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=server, args=(q, cases, total, args.repeats), daemon=True)
    proc.start()
    ucx, worker = _worker()
    ep = worker.create_endpoint_from_hostname("127.0.0.1", q.get(), True)
    view = memoryview(bytearray(total))
    print(f"bare ucxx, {args.total_mib} MiB per transfer, median of {args.repeats}")
    print(f"{'api':6} {'message bytes':>13} {'GB/s':>6}")
    for api, size in cases:
        times = []
        for i in range(args.repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            _post_all(ucx, ep, api, view, size, send=False)
            if i:
                times.append(time.perf_counter() - t0)
        print(f"{api:6} {size:>13} {total / statistics.median(times) / 1e9:6.2f}")
    q.put("done")
    proc.join(10)
    worker.stop_progress_thread()


if __name__ == "__main__":
    main()
