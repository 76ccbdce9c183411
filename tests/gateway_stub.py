"""A stand-in for the repository gateway's HTTP API: the lease listing as recorded
(p_gateway_basic step 6) and a signed lease drop, on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "s3cr3t"  # noqa: S105 (a test key)

# As recorded in p_gateway_basic step 6 (after `transaction pub.gw.local/sw/a`).
RECORDED_LISTING = {
    "data": {
        "pub.gw.local/sw/a": {
            "key_id": "gwkey1",
            "path": "pub.gw.local/sw/a",
            "expires": "2026-12-03 12:36:11.917 +0000 UTC",
            "hostname": "vm",
        },
        "other.gw.local/": {
            "key_id": "k2",
            "path": "other.gw.local/",
            "expires": "2026-12-03 12:36:13.231 +0000 UTC",
            "hostname": "vm",
        },
    },
    "status": "ok",
}


class GatewayStub(BaseHTTPRequestHandler):
    tokens: dict[str, str]
    seen: list[tuple[str, str, str]]

    def log_message(self, *args: object) -> None:
        del args

    def _reply(self, payload: object, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/api/v1/leases":
            self._reply(RECORDED_LISTING)
        else:
            self._reply({"status": "error", "reason": "not found"}, 404)

    def do_DELETE(self) -> None:
        token = self.path.removeprefix("/api/v1/leases/")
        auth = self.headers.get("Authorization", "")
        self.seen.append(("DELETE", token, auth))
        digest = hmac.new(SECRET.encode(), token.encode(), hashlib.sha1).hexdigest()
        if auth != "gwkey1 " + base64.b64encode(digest.encode()).decode():
            self._reply({"reason": "invalid_hmac", "status": "error"}, 401)
        elif token not in self.tokens:
            self._reply({"reason": "invalid lease", "status": "error"})
        else:
            del self.tokens[token]
            self._reply({"status": "ok"})


@contextmanager
def running_gateway(
    tokens: dict[str, str] | None = None,
) -> Iterator[tuple[str, type[GatewayStub]]]:
    """Serve the stub; yield its API URL and its handler class (tokens, requests seen)."""
    handler = type(
        "Handler",
        (GatewayStub,),
        {"tokens": dict(tokens or {"tok-1": "pub.gw.local/sw/a"}), "seen": []},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
