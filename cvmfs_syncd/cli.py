"""Command-line entry point.

``cvmfs-syncd run|sync|check-config|status|wait|release|resign|gc|check|graft``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvmfs_syncd import __version__
from cvmfs_syncd import config as config_mod
from cvmfs_syncd.cvmfs.procs import COMMAND_UMASK
from cvmfs_syncd.errors import ConfigError, RepositoryConfigError, SyncdError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
#: ``sync --timeout`` expired with a batch unfinished (distinct from "not in sync": held).
EXIT_DEADLINE = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvmfs-syncd",
        description="Publish staging directories and S3 prefixes into CernVM-FS repositories.",
    )
    parser.add_argument("--version", action="version", version=f"cvmfs-syncd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c",
            "--config",
            default=config_mod.DEFAULT_CONFIG_PATH,
            help=f"configuration file (default {config_mod.DEFAULT_CONFIG_PATH})",
        )
        return p

    with_config("run", "run the daemon in the foreground")
    p = with_config("sync", "one pass: publish everything pending, exit 0 when in sync")
    p.add_argument("--repository", action="append", help="only this repository (repeatable)")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="a deadline for everything, retries and lock waits included (exit 4 when it "
        "expires with a batch unfinished)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan only: no transaction, no objects, no lock, nothing written",
    )
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    with_config("check-config", "validate the configuration; report every error")
    p = with_config("status", "ask the running daemon what each repository lane is doing")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p = with_config("wait", "exit 0 once the staged file at PATH is live with its current content")
    p.add_argument("path", help="absolute path of a staged file")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after S seconds (exit 3)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p = with_config("release", "confirm a held batch (mass deletion, missing staging path)")
    p.add_argument("repository")
    for name, text in (
        ("resign", "re-sign the whitelist of REPOSITORY now (the daemon's resign, once)"),
        ("gc", "collect garbage in REPOSITORY now, between publishes (the daemon's gc, once)"),
        ("check", "run cvmfs_server check on REPOSITORY now (the daemon's check, once)"),
    ):
        p = with_config(name, text)
        p.add_argument("repository")
    try:
        from cvmfs_syncd import graft_cli
    except ImportError:  # pragma: no cover - graft support is part of the package
        pass
    else:
        graft_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["graft"]:
        from cvmfs_syncd import graft_cli

        return graft_cli.run_graft(args_list[1:], sys.stdin.buffer, sys.stdout, sys.stderr)
    args = _parser().parse_args(args_list)
    # Objects, directories and commands must be world-readable whatever the caller's
    # umask (a hardened root shell's 027 breaks publishing: faults.md F4).
    os.umask(COMMAND_UMASK)
    handlers = {
        "run": _run,
        "sync": _sync,
        "check-config": _check_config,
        "status": _status,
        "wait": _wait,
        "release": _release,
        "resign": _maintenance,
        "gc": _maintenance,
        "check": _maintenance,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"cvmfs-syncd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncdError as exc:
        print(f"cvmfs-syncd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from cvmfs_syncd import log
    from cvmfs_syncd.service import Service

    config = config_mod.load(args.config)
    log.configure(config.daemon.log_level, config.daemon.log_format)
    service = Service(config)
    service.install_signal_handlers()
    return service.run()


def _sync(args: argparse.Namespace) -> int:
    from cvmfs_syncd import log
    from cvmfs_syncd.metrics import Metrics
    from cvmfs_syncd.service import build_lane, make_server
    from cvmfs_syncd.state import State

    config = config_mod.load(args.config)
    log.configure(config.daemon.log_level, config.daemon.log_format)
    wanted = set(args.repository or [r.name for r in config.repositories])
    unknown = wanted - {r.name for r in config.repositories}
    if unknown:
        print(f"cvmfs-syncd: unknown repository {', '.join(sorted(unknown))}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        return _dry_run(config, wanted, as_json=args.json)
    state = State(config.daemon.state_dir)
    metrics = Metrics()
    server = make_server(config)
    failures = []
    expired = False
    end = time.monotonic() + args.timeout
    for repo in config.repositories:
        if repo.name not in wanted:
            continue
        try:
            lane = build_lane(config, repo, state, metrics, server)
        except RepositoryConfigError as exc:
            failures.append(f"{repo.name}: {exc}")
            continue
        ok, why = lane.sync_once(max(0.0, end - time.monotonic()))
        lane.lock.release()
        expired = expired or bool(lane.deadline_report)
        status = lane.status()
        if ok:
            print(f"{repo.name}: in sync (revision {status.last_revision or 'unchanged'})")
        else:
            failures.append(f"{repo.name}: {why}")
    state.close()
    for failure in failures:
        print(f"cvmfs-syncd: {failure}", file=sys.stderr)
    if expired:
        return EXIT_DEADLINE
    return EXIT_FAILED if failures else EXIT_OK


def _dry_run(config: config_mod.Config, wanted: set[str], *, as_json: bool) -> int:
    from cvmfs_syncd.pipeline.dry_run import dry_run

    plans = dry_run(config, [r for r in config.repositories if r.name in wanted])
    if as_json:
        print(json.dumps({"repositories": [p.to_json() for p in plans]}, indent=2))
    else:
        for plan in plans:
            print(plan.text())
    return EXIT_FAILED if any(p.error for p in plans) else EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config)
    problems = []
    for i, repo in enumerate(config.repositories):
        server_conf = config.cvmfs.config_dir / "repositories.d" / repo.name / "server.conf"
        if not server_conf.is_file():
            problems.append(
                f"repository[{i}].name: {repo.name!r} has no {server_conf}"
                " (not created on this host?)"
            )
    problems += _s3_credential_problems(config)
    problems += _schedule_problems(config)
    problems += _gateway_problems(config)
    if problems:
        raise ConfigError(problems, args.config)
    for i, repo in enumerate(config.repositories):
        for j, staging in enumerate(repo.staging):
            if not staging.path.is_dir():
                print(
                    f"warning: repository[{i}].staging[{j}].path: {staging.path}"
                    " does not exist yet",
                    file=sys.stderr,
                )
    names = ", ".join(r.name for r in config.repositories)
    print(f"{args.config}: OK ({len(config.repositories)} repositories: {names})")
    for repo in config.repositories:
        for line in _repository_notes(config, repo):
            print(f"{repo.name}: {line}")
    return EXIT_OK


def _repository_notes(config: config_mod.Config, repo: config_mod.RepositoryConfig) -> list[str]:
    """What an operator should know of how a valid repository will be served."""
    from cvmfs_syncd.cvmfs.gateway import served_by_gateway_here
    from cvmfs_syncd.cvmfs.repo import load_layout
    from cvmfs_syncd.maintenance.repository import GATEWAY_HOST_OFF, GATEWAY_PUBLISHER_OFF

    notes = []
    if not repo.staging and not repo.s3:
        notes.append("no inputs: maintenance only (resign, gc, check as configured)")
    try:
        layout = load_layout(config.cvmfs.config_dir, repo.name)
    except RepositoryConfigError as exc:
        return [*notes, f"server.conf unreadable: {exc}"]
    if served_by_gateway_here(config.cvmfs.config_dir, repo.name):
        notes.append(f"gateway host: gc and tag cleanup are off: {GATEWAY_HOST_OFF}")
    if layout.gateway_url is not None:
        notes.append(f"gateway publisher through {layout.gateway_url}")
        notes.append(
            "files are copied through the transaction (no prepared objects, no grafts): "
            "writing objects beside a gateway is not recorded"
        )
        notes.append(f"resign, gc and tag cleanup are off: {GATEWAY_PUBLISHER_OFF}")
    return notes


def _gateway_problems(config: config_mod.Config) -> list[str]:
    """Settings a gateway publisher cannot honour (what goes through a gateway is recorded
    for transactions only)."""
    from cvmfs_syncd.cvmfs.repo import load_layout
    from cvmfs_syncd.pipeline.ingest import GATEWAY_INGEST_REFUSED

    problems = []
    for i, repo in enumerate(config.repositories):
        try:
            layout = load_layout(config.cvmfs.config_dir, repo.name)
        except RepositoryConfigError:
            continue  # reported by the server.conf check
        if layout.gateway_url is None:
            continue
        sources = [("staging", j, s.tarballs) for j, s in enumerate(repo.staging)]
        sources += [("s3", j, s.tarballs) for j, s in enumerate(repo.s3)]
        problems += [
            f"repository[{i}].{kind}[{j}].tarballs: {GATEWAY_INGEST_REFUSED}"
            for kind, j, tarballs in sources
            if tarballs == "ingest"
        ]
    return problems


def _schedule_problems(config: config_mod.Config) -> list[str]:
    from cvmfs_syncd.scheduler import crontab_trigger

    problems = []
    for i, repo in enumerate(config.repositories):
        for key in ("gc_schedule", "check_schedule"):
            expression = getattr(repo.maintenance, key)
            if not expression:
                continue
            try:
                crontab_trigger(expression)
            except ValueError as exc:
                problems.append(f"repository[{i}].maintenance.{key}: {exc}")
    return problems


def _s3_credential_problems(config: config_mod.Config) -> list[str]:
    problems = []
    for i, repo in enumerate(config.repositories):
        for j, s3 in enumerate(repo.s3):
            if s3.credentials_file is None:
                continue
            where = f"repository[{i}].s3[{j}].credentials_file"
            try:
                mode = s3.credentials_file.stat().st_mode
            except OSError as exc:
                problems.append(f"{where}: cannot read {s3.credentials_file}: {exc.strerror}")
                continue
            if mode & 0o077:
                problems.append(
                    f"{where}: {s3.credentials_file} is readable by other users "
                    f"(mode {mode & 0o777:04o}); chmod 600 it"
                )
    return problems


def _http_get(config: config_mod.Config, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    address = config_mod.parse_address(config.daemon.metrics_address)
    if address is None:
        raise SyncdError("daemon.metrics_address is not set: cannot reach the daemon")
    host = address[0]
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 (we connect to it, not bind)
        host = "127.0.0.1"
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        raise SyncdError(f"cannot reach the daemon at {url}: {exc}") from exc


def _status(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config)
    try:
        _, body = _http_get(config, "/status")
    except SyncdError as exc:
        # No daemon (e.g. a host that publishes with `sync` from cron): the journal knows.
        return _status_from_journal(config, str(exc), as_json=args.json)
    if args.json:
        print(json.dumps(body, indent=2))
        return EXIT_OK
    for name, lane in sorted(body.get("repositories", {}).items()):
        print_lane(name, lane)
    for name, why in body.get("broken", {}).items():
        print(f"{name}: NOT SERVED: {why}")
    for name, maint in sorted(body.get("maintenance", {}).items()):
        print_maintenance(name, maint)
    return EXIT_OK


def print_lane(name: str, lane: dict[str, Any], now: float | None = None) -> None:
    """Print one repository's lane of a ``/status`` body for ``cvmfs-syncd status``."""
    last = lane.get("last_publish_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never"
    print(
        f"{name}: {lane.get('state')}, {lane.get('pending', 0)} pending, last publish {when}"
        f" (revision {lane.get('last_revision') or '-'})"
    )
    if lane.get("ingesting"):
        print(
            f"  ingesting {lane['ingesting']}: {lane.get('ingest_members', 0)} members,"
            f" {lane.get('ingest_content_bytes', 0)} bytes of content,"
            f" {lane.get('ingest_fed_bytes', 0)} bytes fed so far"
        )
    if lane.get("held"):
        print(f"  HELD: {lane['held']}")
    if lane.get("last_error"):
        print(f"  last error: {lane['last_error']}")
    lease = lane.get("lease") or {}
    if lease:
        expires = lease.get("expires_at")
        left = f"{expires - (now or time.time()):.0f} s left" if expires else "expiry not read"
        print(f"  gateway lease on {lease.get('path')}: {left}")
    for source, info in lane.get("sources", {}).items():
        if not info.get("up"):
            print(f"  source {source} DOWN: {info.get('detail')}")
    for aside in lane.get("set_aside", []):
        print(f"  set aside: {aside.get('path')} ({aside.get('reason')})")


def print_maintenance(name: str, maint: dict[str, Any]) -> None:
    """Print one repository's maintenance of a ``/status`` body."""
    expires = (maint.get("whitelist") or {}).get("expires_at")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(expires)) if expires else "unknown"
    print(f"{name}: whitelist valid until {when}")
    for role in ("gateway_publisher", "gateway_host"):
        if maint.get(role):
            off = ", ".join(maint[role].get("off", []))
            print(f"  {role.replace('_', ' ')}: {off} off ({maint[role].get('why')})")
    for problem in maint.get("problems", []):
        print(f"  MAINTENANCE: {problem}")


def _status_from_journal(config: config_mod.Config, why: str, *, as_json: bool) -> int:
    from cvmfs_syncd.pipeline.dry_run import snapshot_state
    from cvmfs_syncd.state import State

    report: dict[str, Any] = {"daemon": why, "repositories": {}}
    with tempfile.TemporaryDirectory(prefix="cvmfs-syncd-status-") as tmp:
        snapshot_state(config.daemon.state_dir, Path(tmp))  # read-only: writes nothing
        state = State(Path(tmp))
        try:
            for repo in config.repositories:
                last = state.last_publish(repo.name)
                unfinished = state.unfinished_batch(repo.name)
                report["repositories"][repo.name] = {
                    "last_publish_at": last[0] if last else None,
                    "last_revision": last[1] if last else None,
                    "unfinished_batch": (
                        {"id": unfinished.id, "stage": str(unfinished.stage)}
                        if unfinished
                        else None
                    ),
                }
        finally:
            state.close()
    if as_json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"no daemon answering ({why}); from the journal:")
    for name, info in sorted(report["repositories"].items()):
        last = info["last_publish_at"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never"
        print(f"{name}: last publish {when} (revision {info['last_revision'] or '-'})")
        if info["unfinished_batch"]:
            batch = info["unfinished_batch"]
            print(f"  batch {batch['id']} unfinished at stage {batch['stage']}")
    return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    from cvmfs_syncd.metrics import Metrics
    from cvmfs_syncd.service import path_status
    from cvmfs_syncd.state import State

    config = config_mod.load(args.config)
    path = Path(os.path.abspath(args.path))
    deadline = time.monotonic() + args.timeout
    state = State(config.daemon.state_dir)
    metrics = Metrics()
    try:
        while True:
            answer = path_status(config, state, metrics, path)
            if answer.get("live"):
                print(
                    f"{path}: live in {answer.get('repository')} at {answer.get('path')}"
                    f" (revision {answer.get('revision')})"
                )
                return EXIT_OK
            if answer.get("unknown"):
                print(f"cvmfs-syncd: {answer.get('reason')}", file=sys.stderr)
                return EXIT_USAGE
            if time.monotonic() >= deadline:
                print(
                    f"cvmfs-syncd: {path} not live after {args.timeout:.0f}s: "
                    f"{answer.get('reason', 'pending')}",
                    file=sys.stderr,
                )
                return EXIT_TIMEOUT
            time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
    finally:
        state.close()


def _maintenance(args: argparse.Namespace) -> int:
    """``resign``/``gc``/``check REPO``: run the daemon's task once, through its locks."""
    from cvmfs_syncd import log
    from cvmfs_syncd.maintenance import run_once
    from cvmfs_syncd.service import make_server

    config = config_mod.load(args.config)
    log.configure(config.daemon.log_level, config.daemon.log_format)
    try:
        repo = config.repository(args.repository)
    except KeyError:
        print(f"cvmfs-syncd: unknown repository {args.repository}", file=sys.stderr)
        return EXIT_USAGE
    # The commands run from the state directory, which also holds the locks and records.
    config.daemon.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    result = run_once(
        config,
        repo,
        args.command,
        server=make_server(config),
        on_wait=lambda why: print(f"{repo.name}: {why}", file=sys.stderr),
    )
    if result.ok:
        print(f"{repo.name}: {args.command}: {result.message}")
        return EXIT_OK
    print(f"cvmfs-syncd: {repo.name}: {args.command} failed: {result.message}", file=sys.stderr)
    return EXIT_FAILED


def _release(args: argparse.Namespace) -> int:
    from cvmfs_syncd.state import State

    config = config_mod.load(args.config)
    try:
        config.repository(args.repository)
    except KeyError:
        print(f"cvmfs-syncd: unknown repository {args.repository}", file=sys.stderr)
        return EXIT_USAGE
    state = State(config.daemon.state_dir)
    state.request_release(args.repository)
    state.close()
    print(f"{args.repository}: held batch released; the daemon publishes it at its next step")
    return EXIT_OK
