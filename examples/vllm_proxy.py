"""A minimal disaggregated-serving proxy for vLLM (the flow of vLLM's own toy proxy).

    python examples/vllm_proxy.py --port 8000 --prefill http://127.0.0.1:8100 \
        --decode http://127.0.0.1:8200

POST /v1/completions (non-streaming): the prompt goes to the prefill server with
``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true}``; the
``kv_transfer_params`` it answers go with the original request to the decode server,
whose answer is returned. The proxy never looks inside those params, so it serves
KvxferConnector and vLLM's NixlConnector alike. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def disaggregated(prefill: str, decode: str, body: dict, path: str) -> dict:
    """Run one completion through prefill then decode; returns decode's answer."""
    first = dict(body, max_tokens=1, stream=False,
                 kv_transfer_params={"do_remote_decode": True})
    first.pop("max_completion_tokens", None)
    answer = post(prefill + path, first)
    params = answer.get("kv_transfer_params")
    if not params:
        raise RuntimeError(f"prefill server returned no kv_transfer_params: {answer}")
    return post(decode + path, dict(body, kv_transfer_params=params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", required=True)
    ap.add_argument("--decode", required=True)
    a = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- http.server's name
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                out, code = disaggregated(a.prefill, a.decode, body, self.path), 200
            except Exception as exc:  # noqa: BLE001 -- reported to the client
                out, code = {"error": f"{type(exc).__name__}: {exc}"}, 502
            data = json.dumps(out).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

    ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
