"""Test-side handle on a fake gateway repository: one storage, one gateway, several publishers.

``FakeGateway(base, repo)`` sets the repository up as the recordings did (gateway.md, "How a
gateway repository is set up"): ``mkfs -z`` on the first publisher's host, which also holds
the storage and the gateway; the gw upstream, the receiver's storage and the gateway key
added to its configuration; the gateway's API served over HTTP on 127.0.0.1 (a free port)
by a thread of this process. Every publisher is a ``FakeStratum0`` of its own below
``base/<name>`` (configuration, keys, spool, union directory, ``bin/cvmfs_server``), all
publishing into the one storage through the one gateway, whose lease database
(``<first publisher>/var/lib/cvmfs-gateway/leases.json``) survives ``stop()``/``start()``.

Use it as a context manager (or call ``close()``): the server thread and the fake's
processes must not outlive the test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from tests.fake_cvmfs.server.clock import fake_now
from tests.fake_cvmfs.server.files import write_atomic
from tests.fake_cvmfs.server.gateway import make_gateway_repository, set_up_publisher
from tests.fake_cvmfs.server.leases import (
    GatewayApi,
    lease_table,
    signature,
    update_user_config,
    write_gateway_config,
)
from tests.fake_cvmfs.stratum0 import FakeStratum0


class _ApiServer(ThreadingHTTPServer):
    """The HTTP server: joins its request threads when closed (no leaked threads)."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, port: int, api: GatewayApi) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.api = api


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to ``GatewayApi.handle``."""

    timeout = 5.0  # a client that sends nothing cannot keep a request thread forever

    def do_GET(self) -> None:
        """GET."""
        self._answer("GET")

    def do_POST(self) -> None:
        """POST."""
        self._answer("POST")

    def do_DELETE(self) -> None:
        """DELETE."""
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        api = cast(_ApiServer, self.server).api
        client = f"{self.client_address[0]}:{self.client_address[1]}"
        status, payload = api.handle(
            method, self.path, self.headers.get("Authorization"), body, client
        )
        self.send_response(status)
        kind = "application/json" if payload.startswith(b"{") else "text/plain; charset=utf-8"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged."""


class FakeGateway:
    """A gateway repository ``repo`` below ``base``: publishers, the gateway, its clock."""

    def __init__(
        self,
        base: Path,
        repo: str,
        *,
        publishers: Sequence[str] = ("p1", "p2"),
        hostname: str | None = None,
        max_lease_time: float = 30.0,
        key_id: str = "gwkey1",
        stratum0_url: str | None = None,
    ) -> None:
        """Make the repository (``mkfs -z`` on ``publishers[0]``), start the gateway and add
        the other publishers. ``hostname`` is every publisher's host name (the leases'
        ``hostname``; default: this machine's); ``max_lease_time`` is in seconds."""
        if not publishers:
            raise ValueError("a gateway repository needs at least one publisher")
        self.base = Path(base).absolute()
        self.repo = repo
        self.key_id = key_id
        self.secret = os.urandom(16).hex()
        first = FakeStratum0(self.base / publishers[0])
        self._publishers: dict[str, FakeStratum0] = {publishers[0]: first}
        self.config_dir = first.config_dir / "gateway"
        self.work_dir = first.root / "var" / "lib" / "cvmfs-gateway"
        self._api = GatewayApi(self.config_dir)
        self._server: _ApiServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        first.mkfs(repo, gc=True, stratum0_url=stratum0_url)
        write_gateway_config(
            self.config_dir,
            [repo],
            key_id,
            self.secret,
            max_lease_time=max_lease_time,
            port=0,
            work_dir=self.work_dir,
        )
        self.start()
        try:
            update_user_config(self.config_dir, port=self._port)
            if hostname:
                (first.root / "etc" / "hostname").write_text(hostname + "\n")
            make_gateway_repository(first.repository(repo), self.url, key_id, self.secret)
            for name in publishers[1:]:
                self.add_publisher(name, hostname=hostname)
        except BaseException:
            self.close()
            raise

    # -- publishers ---------------------------------------------------------------------------
    def publisher(self, name: str) -> FakeStratum0:
        """The fake host ``name`` (``server_command``, ``run``, ``state`` ... of its own;
        ``state(repo)["revision"]`` is the revision its mount shows, ``revision(repo)`` the
        published one)."""
        return self._publishers[name]

    @property
    def publishers(self) -> dict[str, FakeStratum0]:
        """Every publisher by name, the storage's host first."""
        return dict(self._publishers)

    def add_publisher(self, name: str, *, hostname: str | None = None) -> FakeStratum0:
        """Set up one more publisher host (its own ROOT ``base/<name>``), on the newest
        published revision and without a ``stats.db``/``reflog.chksum`` (conflict 2)."""
        if name in self._publishers:
            raise ValueError(f"publisher {name!r} exists already")
        host = next(iter(self._publishers.values()))
        added = FakeStratum0(self.base / name)
        set_up_publisher(host.repository(self.repo), added.root, hostname)
        self._publishers[name] = added
        return added

    # -- the gateway --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The gateway's TCP port on 127.0.0.1 (kept across restarts)."""
        return self._port

    @property
    def url(self) -> str:
        """The API's URL, as in the publishers' ``CVMFS_UPSTREAM_STORAGE``."""
        return f"http://127.0.0.1:{self._port}/api/v1"

    @property
    def running(self) -> bool:
        """Whether the gateway answers (stopped: connections are refused)."""
        return self._server is not None

    def start(self) -> None:
        """Start the gateway (on its previous port after a ``stop``)."""
        if self._server is not None:
            return
        server = _ApiServer(self._port, self._api)
        self._port = int(server.server_address[1])
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-gateway-{self._port}",
        )
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop the gateway: its port refuses connections, its leases stay in the database."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join()

    def restart(self) -> None:
        """Stop and start the gateway (p_gateway_down 12)."""
        self.stop()
        self.start()

    def set_max_lease_time(self, seconds: float) -> None:
        """Change ``max_lease_time`` in ``user.json``; new leases get it at once."""
        update_user_config(self.config_dir, max_lease_time=seconds)

    def set_clock_offset(self, seconds: float) -> None:
        """Let the gateway's clock run ``seconds`` ahead of the real one (expires leases
        without waiting; the publishers' clocks are their own ``set_clock``)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.work_dir / "fake-clock", f"{float(seconds):+}".encode())

    def advance_clock(self, seconds: float) -> None:
        """Move the gateway's clock ``seconds`` further ahead (``sleep`` steps of a replay)."""
        try:
            current = float((self.work_dir / "fake-clock").read_text().strip() or 0)
        except FileNotFoundError:
            current = 0.0
        self.set_clock_offset(current + seconds)

    def now(self) -> float:
        """The gateway's clock."""
        return fake_now(self.work_dir)

    # -- the API ----------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: bytes = b"", *, sign: bytes | None = None
    ) -> tuple[int, bytes]:
        """One HTTP request to the API (``path`` below ``/api/v1``); ``sign``: the bytes to
        sign with the repository's key (the body, or the token of a DELETE). Raises
        ``ConnectionRefusedError`` while the gateway is stopped."""
        headers = {}
        if sign is not None:
            headers["Authorization"] = f"{self.key_id} {signature(self.secret, sign)}"
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        try:
            connection.request(method, "/api/v1" + path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def leases(self) -> dict[str, dict[str, Any]]:
        """``GET /api/v1/leases``'s ``data``: live leases by ``<repo>/<path>``."""
        _, payload = self.request("GET", "/leases")
        data = json.loads(payload)["data"]
        return cast(dict[str, dict[str, Any]], data)

    def lease_tokens(self) -> dict[str, str]:
        """Every lease in the database (expired ones too) as ``<repo>/<path>`` -> token."""
        with lease_table(self.work_dir) as table:
            return {f"{v['repository']}/{v['path']}": token for token, v in table.items()}

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the gateway and kill fake commands still running on any publisher."""
        self.stop()
        for publisher in self._publishers.values():
            with contextlib.suppress(OSError):
                publisher.kill_orphans()

    def __enter__(self) -> FakeGateway:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
