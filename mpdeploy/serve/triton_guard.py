"""The HTTP front of the Triton server mpdeploy launches: refuse a request that declares a huge shape
before Triton's HTTP/JSON parser sees it.

Triton 2.51 allocates the byte size an HTTP/JSON inference request *declares* before checking it
against the model config: one request with shape [8,1,32000000,32000000] aborts the server
(docs/ship.md). `run_tritonserver` therefore restricts Triton's HTTP inference to a per-run secret
header that only this front holds: clients talk to the front, which reads each inference request's
JSON header, refuses one whose declared element count exceeds the model's limit (400, Triton's error
format, nothing forwarded), and forwards the rest with the header added. The limit per model is the
`mpdeploy_max_request_elements` parameter of its `config.pbtxt` (written by `mpdeploy ship`), or the
same bound computed from its dims and max_batch_size for a config that lacks it.

Standard library only (http.server / http.client): a loopback smoke-test front, not a production proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from mpdeploy.serve.triton_config import LIMIT_PARAMETER, request_limit
from mpdeploy.serve.triton_repo import CONFIG_FILE

logger = logging.getLogger(__name__)

_INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer$")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}
MAX_BODY_BYTES = 1 << 30  # past any request a limit-respecting client sends; bounds what the front buffers


def model_limits(repo: Path) -> dict[str, int]:
    """model name -> most elements one inference request may declare, from each model's config.pbtxt."""
    from mpdeploy.serve.triton_config import parse_config

    limits = {}
    for config in sorted(Path(repo).glob(f"*/{CONFIG_FILE}")):
        try:
            cfg = parse_config(config.read_text())
        except Exception as exc:  # noqa: BLE001 - Triton reports an unreadable config itself
            logger.warning("%s does not parse (%s); its model gets no request limit", config, type(exc).__name__)
            continue
        limits[cfg.name or config.parent.name] = request_limit(cfg)
    return limits


def declared_elements(header: Mapping) -> int:
    """Elements the inputs of a KServe v2 JSON inference header declare (absolute values: a negative
    dim is Triton's to refuse, and must not hide a huge one). ValueError if unreadable."""
    total = 0
    for spec in header.get("inputs") or []:
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError("input shape is not a list of integers")
        count = 1
        for d in shape:
            count *= abs(d)
        total += count
    return total


def refusal(model: str, body: bytes, headers: Mapping[str, str], limits: Mapping[str, int]) -> str | None:
    """Why the inference request `body` to `model` must not reach Triton, or None to forward it."""
    limit = limits.get(model)
    if limit is None:
        return None  # unknown model: Triton answers "unknown model" without allocating
    length = headers.get("Inference-Header-Content-Length")
    head = body
    if length is not None:
        try:
            head = body[: int(length)]
        except ValueError:
            return None  # Triton refuses a bad header length itself
    try:
        elements = declared_elements(json.loads(head))
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None  # Triton refuses what it cannot parse, without allocating
    if elements > limit:
        return (f"request declares {elements} input elements; model '{model}' takes at most {limit} per request "
                f"({LIMIT_PARAMETER} in its {CONFIG_FILE})")
    return None


def _handler(triton_port: int, key_header: tuple[str, str] | None, limits: Mapping[str, int]):
    class Front(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient expects

        def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
            logger.debug("front: " + format, *args)

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                return self._reply(413, b'{"error":"request body too large"}', [("Content-Type", "application/json")])
            body = self.rfile.read(length) if length else b""
            match = _INFER_PATH.match(self.path.split("?", 1)[0])
            why = refusal(match["model"], body, self.headers, limits) if match and self.command == "POST" else None
            if why is not None:
                return self._reply(400, json.dumps({"error": why}).encode(), [("Content-Type", "application/json")])
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if key_header is not None:
                headers = {k: v for k, v in headers.items() if k.lower() != key_header[0].lower()}
                headers[key_header[0]] = key_header[1]
            conn = http.client.HTTPConnection("127.0.0.1", triton_port, timeout=300)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            except (OSError, http.client.HTTPException) as exc:
                data, out, status = json.dumps({"error": f"tritonserver: {exc}"}).encode(), [], 502
            else:
                status = resp.status
            finally:
                conn.close()
            self._reply(status, data, out)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward  # noqa: N815 - http.server's names

    return Front


@contextlib.contextmanager
def http_front(triton_port: int, key_header: tuple[str, str] | None, repo: Path, port: int = 0) -> Iterator[int]:
    """Serve the front on 127.0.0.1 (`port`, 0: any free one) until the block exits; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(triton_port, key_header,
                                                                            model_limits(repo)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="mpdeploy-triton-front", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
