"""Every Prometheus metric of cvmfs-syncd, defined in one place, and the HTTP endpoint.

The endpoint serves ``/metrics`` (Prometheus text format), ``/status`` (JSON: what each
lane is doing; ``/status?path=/abs/staged/file`` also says whether that file is live with
its current content) and ``/healthz`` (200 when healthy, 503 otherwise).
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cvmfs_syncd import __version__

# ``*_created`` series double every counter for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class Metrics:
    """The daemon's metrics, registered on a private registry (one per daemon instance)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        repo = ["repository"]
        src = ["repository", "source"]
        self.info = Info("cvmfs_syncd_build", "Build information of cvmfs-syncd.", registry=r)
        self.info.info({"version": __version__})
        self.changes_detected = Counter(
            "cvmfs_syncd_changes_detected_total",
            "Changes reported by input sources (watch events and scans).",
            src,
            registry=r,
        )
        self.reconciled_changes = Counter(
            "cvmfs_syncd_reconciliation_changes_total",
            "Changes found by a reconciliation scan that the watcher had missed.",
            src,
            registry=r,
        )
        self.pending_changes = Gauge(
            "cvmfs_syncd_pending_changes", "Paths waiting to be published.", repo, registry=r
        )
        self.batches = Counter(
            "cvmfs_syncd_batches_total",
            "Batches cut, by why they were cut.",
            ["repository", "reason"],
            registry=r,
        )
        self.publishes = Counter(
            "cvmfs_syncd_publishes_total", "Successful publishes.", repo, registry=r
        )
        self.publish_failures = Counter(
            "cvmfs_syncd_publish_failures_total",
            "Failed publish attempts, by outcome.",
            ["repository", "outcome"],
            registry=r,
        )
        self.publish_duration = Histogram(
            "cvmfs_syncd_publish_duration_seconds",
            "Time from opening the transaction to a successful publish.",
            repo,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.drop_latency = Histogram(
            "cvmfs_syncd_drop_to_published_seconds",
            "Time from a change being detected to it being live in the repository.",
            repo,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.last_publish = Gauge(
            "cvmfs_syncd_last_publish_timestamp_seconds",
            "Time of the last successful publish.",
            repo,
            registry=r,
        )
        self.revision = Gauge(
            "cvmfs_syncd_revision", "Revision of the last publish.", repo, registry=r
        )
        self.transaction_open = Gauge(
            "cvmfs_syncd_transaction_open",
            "1 while a transaction the daemon opened is open.",
            repo,
            registry=r,
        )
        self.transaction_open_since = Gauge(
            "cvmfs_syncd_transaction_open_since_timestamp_seconds",
            "When the currently open transaction (any owner) was first seen; 0 if none.",
            repo,
            registry=r,
        )
        self.lease_wait_since = Gauge(
            "cvmfs_syncd_lease_wait_since_timestamp_seconds",
            "Behind a gateway: since when the next batch waits for a busy lease; 0 if it does not.",
            repo,
            registry=r,
        )
        self.foreign_transaction = Gauge(
            "cvmfs_syncd_foreign_transaction_open",
            "1 while a transaction the daemon did not open (an operator's, gc's) is open.",
            repo,
            registry=r,
        )
        self.unreadable_objects = Gauge(
            "cvmfs_syncd_storage_unreadable_objects",
            "Data objects not world-readable in the start-up sample of local storage "
            "(written under a restrictive umask: clients get HTTP 403).",
            repo,
            registry=r,
        )
        self.held = Gauge(
            "cvmfs_syncd_lane_held",
            "1 while the lane holds publishing and needs an operator, by reason.",
            ["repository", "reason"],
            registry=r,
        )
        self.skipped = Counter(
            "cvmfs_syncd_inputs_skipped_total",
            "Inputs not published, by reason.",
            ["repository", "source", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "cvmfs_syncd_retries_total",
            "Operations retried after a failure, by operation.",
            ["repository", "operation"],
            registry=r,
        )
        self.source_up = Gauge(
            "cvmfs_syncd_source_up",
            "1 if the input source is reachable and watched.",
            src,
            registry=r,
        )
        self.s3_listed_objects = Gauge(
            "cvmfs_syncd_s3_listed_objects",
            "Objects under the prefix of an S3 source at its last successful listing.",
            src,
            registry=r,
        )
        self.s3_last_listing = Gauge(
            "cvmfs_syncd_s3_last_listing_timestamp_seconds",
            "When an S3 source last listed its prefix successfully.",
            src,
            registry=r,
        )
        self.published_bytes = Counter(
            "cvmfs_syncd_published_bytes_total",
            "Bytes of file content published.",
            repo,
            registry=r,
        )
        self.ingest_duration = Histogram(
            "cvmfs_syncd_ingest_duration_seconds",
            "Time from taking a tarball drop to it being live (check, ingest or unpack, publish).",
            repo,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ingest_refused = Counter(
            "cvmfs_syncd_ingest_refused_total",
            "Tarball drops set aside, by the reason they were refused.",
            ["repository", "reason"],
            registry=r,
        )
        self.grafted_files = Counter(
            "cvmfs_syncd_grafted_files_total", "Files published as grafts.", repo, registry=r
        )
        # Maintenance. The label is ``task``, not ``job``: Prometheus gives every scraped
        # series the target's ``job`` label, which would rename ours to ``exported_job``.
        task = ["repository", "task"]
        self.whitelist_expiry = Gauge(
            "cvmfs_syncd_whitelist_expiry_timestamp_seconds",
            "When the repository's whitelist expires (0: its expiry line is unreadable).",
            repo,
            registry=r,
        )
        self.maintenance_last_success = Gauge(
            "cvmfs_syncd_maintenance_last_success_timestamp_seconds",
            "Last successful run of a maintenance task (resign: when the whitelist was signed).",
            task,
            registry=r,
        )
        self.maintenance_duration = Gauge(
            "cvmfs_syncd_maintenance_last_duration_seconds",
            "Duration of the last run of a maintenance task.",
            task,
            registry=r,
        )
        self.maintenance_failures = Counter(
            "cvmfs_syncd_maintenance_failures_total",
            "Maintenance task runs that failed or could not run.",
            task,
            registry=r,
        )
        self.maintenance_failing = Gauge(
            "cvmfs_syncd_maintenance_failing",
            "1 while the last run of a maintenance task failed or could not run.",
            task,
            registry=r,
        )
        self.maintenance_enabled_since = Gauge(
            "cvmfs_syncd_maintenance_enabled_since_timestamp_seconds",
            "Since when the daemon runs a maintenance task for the repository; 0 if it does not.",
            task,
            registry=r,
        )
        self.automatic_tags = Gauge(
            "cvmfs_syncd_automatic_tags",
            "Automatic generic-* tags older than auto_tag_keep left after the last tag "
            "cleanup (0: all removed).",
            repo,
            registry=r,
        )
        self.integrity = Gauge(
            "cvmfs_syncd_integrity",
            "1 for what the last check with check_integrity did to object contents: "
            "verified (cvmfs check -i, or a sampled pass over S3), not_checked "
            "(check -i skipped it), problems (objects that do not hash to their name).",
            ["repository", "result"],
            registry=r,
        )
        self.master_key_present = Gauge(
            "cvmfs_syncd_master_key_present",
            "1 if the repository's master key is on this host (resign possible).",
            repo,
            registry=r,
        )

    def init_repository(self, repo: str, sources: list[str]) -> None:
        """Create the labelled series of a repository so that they exist from the start."""
        for metric in (
            self.pending_changes,
            self.publishes,
            self.transaction_open,
            self.foreign_transaction,
            self.transaction_open_since,
            self.lease_wait_since,
            self.published_bytes,
            self.grafted_files,
            self.unreadable_objects,
        ):
            metric.labels(repo)
        self.publish_duration.labels(repo)
        self.drop_latency.labels(repo)
        self.ingest_duration.labels(repo)
        for source in sources:
            self.changes_detected.labels(repo, source)
            self.reconciled_changes.labels(repo, source)
            self.source_up.labels(repo, source)
        for task in ("resign", "gc", "check"):
            self.maintenance_failures.labels(repo, task)
            self.maintenance_failing.labels(repo, task)
            self.maintenance_enabled_since.labels(repo, task)
        self.master_key_present.labels(repo)

    def render(self) -> bytes:
        """Return the text exposition of every metric."""
        return bytes(generate_latest(self.registry))


StatusProvider = Callable[[dict[str, str]], tuple[int, dict[str, Any]]]


class MetricsServer:
    """A small threaded HTTP server for /metrics, /status and /healthz."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        status: StatusProvider,
        health: Callable[[], tuple[bool, str]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "cvmfs-syncd"

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif url.path == "/status":
                    code, body = status(query)
                    self._json(code, body)
                elif url.path == "/healthz":
                    ok, why = health()
                    self._json(200 if ok else 503, {"healthy": ok, "detail": why})
                else:
                    self._json(404, {"error": f"no such endpoint {url.path}"})

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, indent=2, default=str).encode() + b"\n"
                self._send(code, data, "application/json")

            def _send(self, code: int, data: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Silence per-request logging; scrapes would flood the journal."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self.address = self._server.server_address
        _ = outer

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
