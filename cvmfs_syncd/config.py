"""TOML configuration: loading, validation (every error at once, with its key path), values.

Loading and validating are separate steps so that a reload can validate a new file first
and swap it in only when it is valid.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cvmfs_syncd.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/cvmfs-syncd/cvmfs-syncd.toml"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9477"

_SIZE_UNITS = {"B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DEFAULT_IGNORE = ("*.tmp", "*.part", ".*.swp", ".*.swx", "*~", ".~lock.*#", ".nfs*")


def parse_size(value: object) -> int:
    """Given ``"256MiB"`` or an int number of bytes, return bytes. Raise ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '256MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as '256MiB'")
    match = _SIZE_RE.match(value)
    unit = match.group(2).upper() if match else ""
    if not match or (unit or "B") not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use B, KiB, MiB, GiB, e.g. '256MiB')")
    return int(float(match.group(1)) * _SIZE_UNITS[unit or "B"])


def parse_duration(value: object) -> float:
    """Given ``"7d"``/``"90s"`` or a number of seconds, return seconds. Raise ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '7d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '30s' or '7d'")
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (use s, m, h, d, e.g. '7d')")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[daemon]`` table."""

    state_dir: Path = Path("/var/lib/cvmfs-syncd")
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    log_level: str = "info"
    log_format: str = "auto"
    stall_seconds: float = 900.0
    rescan_seconds: float = 300.0
    stop_timeout_seconds: float = 600.0
    prepare_workers: int = 2


@dataclass(frozen=True)
class CvmfsConfig:
    """The ``[cvmfs]`` table: how to reach the CVMFS tools and configuration."""

    server_command: tuple[str, ...] = ("cvmfs_server",)
    swissknife_command: tuple[str, ...] = ("cvmfs_swissknife",)
    config_dir: Path = Path("/etc/cvmfs")
    transaction_timeout_seconds: float = 120.0
    publish_timeout_seconds: float = 1800.0
    command_timeout_seconds: float = 600.0


@dataclass(frozen=True)
class StagingConfig:
    """One ``[[repository.staging]]`` source."""

    path: Path
    target: str = "/"
    mode: str = "mirror"
    settle_seconds: float = 2.0
    ready_marker: str = ""
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    allow_reserved_names: bool = False
    graft_threshold: int = 0
    max_delete_share: float = 0.5
    prepare: bool = True

    @property
    def name(self) -> str:
        """A stable, human-readable source name (used in logs, metrics and the journal)."""
        return f"staging:{self.path}"


@dataclass(frozen=True)
class S3Config:
    """One ``[[repository.s3]]`` source."""

    bucket: str
    prefix: str = ""
    target: str = "/"
    endpoint_url: str = ""
    region: str = ""
    credentials_file: Path | None = None
    profile: str = "default"
    poll_seconds: float = 30.0
    mode: str = "mirror"
    ready_marker: str = ""
    copy_below: int = 1024 * 1024
    max_delete_share: float = 0.5
    allow_reserved_names: bool = False
    prepare: bool = True

    @property
    def name(self) -> str:
        """A stable, human-readable source name."""
        return f"s3:{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class MaintenanceConfig:
    """The ``[repository.maintenance]`` table."""

    resign_before_expiry_seconds: float = 7 * 86400.0
    resign_days: int = 30
    gc_schedule: str = ""
    gc_keep_seconds: float | None = None
    gc_keep_revisions: int | None = None
    auto_tag_keep_seconds: float | None = None
    check_schedule: str = ""
    check_integrity: bool = False


@dataclass(frozen=True)
class RepositoryConfig:
    """One ``[[repository]]``."""

    name: str
    quiet_seconds: float = 5.0
    max_batch_seconds: float = 60.0
    max_batch_files: int = 50000
    max_batch_bytes: int = 8 * 1024**3
    retry_initial_seconds: float = 5.0
    retry_max_seconds: float = 600.0
    staging: tuple[StagingConfig, ...] = ()
    s3: tuple[S3Config, ...] = ()
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    daemon: DaemonConfig
    cvmfs: CvmfsConfig
    repositories: tuple[RepositoryConfig, ...]
    source_path: str = ""

    def repository(self, name: str) -> RepositoryConfig:
        """Return the repository named ``name``; raise KeyError if there is none."""
        for repo in self.repositories:
            if repo.name == name:
                return repo
        raise KeyError(name)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; raise ConfigError naming the file on I/O or syntax errors."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"configuration file {path} does not exist"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], str(path)) from None


def load(path: str | Path) -> Config:
    """Load and validate the configuration file at ``path``; raise ConfigError."""
    return validate(load_file(path), source_path=str(path))


class _Reader:
    """Reads typed values out of a table, collecting every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def table(self, data: object, where: str) -> dict[str, Any]:
        if isinstance(data, dict):
            return data
        self.problems.append(f"{where}: expected a table")
        return {}

    def unknown(self, data: dict[str, Any], where: str, known: set[str]) -> None:
        for key in sorted(set(data) - known):
            self.problems.append(f"{where}.{key}: unknown key")

    def get(self, data: dict[str, Any], key: str, where: str, kind: type, default: Any) -> Any:
        if key not in data:
            return default
        value = data[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            self.problems.append(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
            return default
        return value

    def size(self, data: dict[str, Any], key: str, where: str, default: int) -> int:
        if key not in data:
            return default
        try:
            return parse_size(data[key])
        except ValueError as exc:
            self.problems.append(f"{where}.{key}: {exc}")
            return default

    def duration(self, data: dict[str, Any], key: str, where: str, default: float) -> float:
        if key not in data:
            return default
        try:
            return parse_duration(data[key])
        except ValueError as exc:
            self.problems.append(f"{where}.{key}: {exc}")
            return default

    def command(self, data: dict[str, Any], key: str, where: str, default: tuple[str, ...]):  # type: ignore[no-untyped-def]
        value = data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                argv = tuple(shlex.split(value))
            except ValueError as exc:
                self.problems.append(f"{where}.{key}: {exc}")
                return default
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            argv = tuple(value)
        else:
            self.problems.append(f"{where}.{key}: expected a command string or list of strings")
            return default
        if not argv:
            self.problems.append(f"{where}.{key}: must not be empty")
            return default
        return argv


def normalise_target(value: str) -> str | None:
    """Return ``value`` as a canonical absolute repository path, or None if it is unsafe."""
    if not value.startswith("/") or "\0" in value:
        return None
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return "/" + "/".join(parts)


def targets_overlap(a: str, b: str) -> bool:
    """Return True if repository directories ``a`` and ``b`` contain one another."""
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def _validate_staging(r: _Reader, data: dict[str, Any], where: str) -> StagingConfig | None:
    r.unknown(
        data,
        where,
        {
            "path",
            "target",
            "mode",
            "settle_seconds",
            "ready_marker",
            "ignore",
            "allow_reserved_names",
            "graft_threshold",
            "max_delete_share",
            "prepare",
        },
    )
    path = r.get(data, "path", where, str, None)
    if path is None:
        r.problems.append(f"{where}.path: required")
    elif not path.startswith("/"):
        r.problems.append(f"{where}.path: must be an absolute path, got {path!r}")
    target = _target(r, data, where)
    mode = _mode(r, data, where)
    marker = _marker(r, data, where)
    ignore = r.get(data, "ignore", where, list, list(DEFAULT_IGNORE))
    if not all(isinstance(x, str) and x for x in ignore):
        r.problems.append(f"{where}.ignore: expected a list of non-empty glob patterns")
        ignore = list(DEFAULT_IGNORE)
    share = _share(r, data, where)
    settle = r.duration(data, "settle_seconds", where, 2.0)
    threshold = r.size(data, "graft_threshold", where, 0)
    allow = r.get(data, "allow_reserved_names", where, bool, False)
    if path is None or not path.startswith("/"):
        return None
    return StagingConfig(
        path=Path(path),
        target=target,
        mode=mode,
        settle_seconds=settle,
        ready_marker=marker,
        ignore=tuple(ignore),
        allow_reserved_names=allow,
        graft_threshold=threshold,
        max_delete_share=share,
        prepare=r.get(data, "prepare", where, bool, True),
    )


def _target(r: _Reader, data: dict[str, Any], where: str) -> str:
    raw = r.get(data, "target", where, str, "/")
    target = normalise_target(raw)
    if target is None:
        r.problems.append(f"{where}.target: must be an absolute path without '..', got {raw!r}")
        return "/"
    return target


def _mode(r: _Reader, data: dict[str, Any], where: str) -> str:
    mode = r.get(data, "mode", where, str, "mirror")
    if mode not in ("mirror", "inbox"):
        r.problems.append(f"{where}.mode: must be 'mirror' or 'inbox', got {mode!r}")
        return "mirror"
    return str(mode)


def _marker(r: _Reader, data: dict[str, Any], where: str) -> str:
    marker = r.get(data, "ready_marker", where, str, "")
    if marker and ("/" in marker or marker in (".", "..") or "\0" in marker):
        r.problems.append(f"{where}.ready_marker: must be a plain file name, got {marker!r}")
        return ""
    return str(marker)


def _share(r: _Reader, data: dict[str, Any], where: str) -> float:
    share = r.get(data, "max_delete_share", where, float, 0.5)
    if not 0.0 < share <= 1.0:
        r.problems.append(f"{where}.max_delete_share: must be in (0, 1], got {share!r}")
        return 0.5
    return float(share)


def _validate_s3(r: _Reader, data: dict[str, Any], where: str) -> S3Config | None:
    r.unknown(
        data,
        where,
        {
            "endpoint_url",
            "region",
            "bucket",
            "prefix",
            "target",
            "credentials_file",
            "profile",
            "poll_seconds",
            "mode",
            "ready_marker",
            "copy_below",
            "max_delete_share",
            "allow_reserved_names",
            "prepare",
        },
    )
    bucket = r.get(data, "bucket", where, str, "")
    if not bucket:
        r.problems.append(f"{where}.bucket: required")
    prefix = r.get(data, "prefix", where, str, "")
    if prefix.startswith("/"):
        r.problems.append(f"{where}.prefix: S3 keys do not start with '/', got {prefix!r}")
    endpoint = r.get(data, "endpoint_url", where, str, "")
    if endpoint and not re.match(r"^https?://[^/\s]+", endpoint):
        r.problems.append(f"{where}.endpoint_url: expected http(s)://host[:port], got {endpoint!r}")
    creds = r.get(data, "credentials_file", where, str, "")
    if creds and not creds.startswith("/"):
        r.problems.append(f"{where}.credentials_file: must be an absolute path")
    poll = r.duration(data, "poll_seconds", where, 30.0)
    if poll < 1:
        r.problems.append(f"{where}.poll_seconds: must be at least 1 second")
    config = S3Config(
        bucket=bucket,
        prefix=prefix,
        target=_target(r, data, where),
        endpoint_url=endpoint,
        region=r.get(data, "region", where, str, ""),
        credentials_file=Path(creds) if creds else None,
        profile=r.get(data, "profile", where, str, "default"),
        poll_seconds=poll,
        mode=_mode(r, data, where),
        ready_marker=_marker(r, data, where),
        copy_below=r.size(data, "copy_below", where, 1024 * 1024),
        max_delete_share=_share(r, data, where),
        allow_reserved_names=r.get(data, "allow_reserved_names", where, bool, False),
        prepare=r.get(data, "prepare", where, bool, True),
    )
    return config if bucket else None


_CRON_FIELD = re.compile(r"^[\d*,/\-A-Za-z]+$")


def _validate_maintenance(r: _Reader, data: dict[str, Any], where: str) -> MaintenanceConfig:
    r.unknown(
        data,
        where,
        {
            "resign_before_expiry",
            "resign_days",
            "gc_schedule",
            "gc_keep",
            "gc_keep_revisions",
            "auto_tag_keep",
            "check_schedule",
            "check_integrity",
        },
    )
    days = r.get(data, "resign_days", where, int, 30)
    if not 1 <= days <= 365:
        r.problems.append(f"{where}.resign_days: must be a whole number of days from 1 to 365")
        days = 30
    before = r.duration(data, "resign_before_expiry", where, 7 * 86400.0)
    if before >= days * 86400:
        r.problems.append(
            f"{where}.resign_before_expiry: must be shorter than resign_days ({days}d), "
            "or every check would re-sign"
        )
    keep_s = r.duration(data, "gc_keep", where, -1.0) if "gc_keep" in data else None
    keep_n = r.get(data, "gc_keep_revisions", where, int, None)
    if keep_s is not None and keep_n is not None:
        r.problems.append(f"{where}: gc_keep and gc_keep_revisions are exclusive; set one")
    if keep_n is not None and keep_n < 1:
        r.problems.append(f"{where}.gc_keep_revisions: must be at least 1")
    auto_tag = r.duration(data, "auto_tag_keep", where, -1.0) if "auto_tag_keep" in data else None
    schedules = {}
    for key in ("gc_schedule", "check_schedule"):
        value = r.get(data, key, where, str, "")
        if value and (len(value.split()) != 5 or not all(map(_CRON_FIELD.match, value.split()))):
            r.problems.append(f"{where}.{key}: expected 5 crontab fields, got {value!r}")
            value = ""
        schedules[key] = value
    return MaintenanceConfig(
        resign_before_expiry_seconds=before,
        resign_days=days,
        gc_schedule=schedules["gc_schedule"],
        gc_keep_seconds=keep_s,
        gc_keep_revisions=keep_n,
        auto_tag_keep_seconds=auto_tag,
        check_schedule=schedules["check_schedule"],
        check_integrity=r.get(data, "check_integrity", where, bool, False),
    )


def _validate_repository(r: _Reader, data: dict[str, Any], where: str) -> RepositoryConfig | None:
    r.unknown(
        data,
        where,
        {
            "name",
            "quiet_seconds",
            "max_batch_seconds",
            "max_batch_files",
            "max_batch_bytes",
            "retry_initial_seconds",
            "retry_max_seconds",
            "staging",
            "s3",
            "maintenance",
        },
    )
    name = r.get(data, "name", where, str, "")
    if not name:
        r.problems.append(f"{where}.name: required")
    elif not _REPO_NAME_RE.match(name):
        r.problems.append(f"{where}.name: {name!r} is not a repository name")
    quiet = r.duration(data, "quiet_seconds", where, 5.0)
    max_age = r.duration(data, "max_batch_seconds", where, 60.0)
    if max_age < quiet:
        r.problems.append(f"{where}.max_batch_seconds: must not be shorter than quiet_seconds")
    max_files = r.get(data, "max_batch_files", where, int, 50000)
    if max_files < 1:
        r.problems.append(f"{where}.max_batch_files: must be at least 1")
    staging_raw = r.get(data, "staging", where, list, [])
    s3_raw = r.get(data, "s3", where, list, [])
    staging = [
        _validate_staging(r, r.table(item, f"{where}.staging[{i}]"), f"{where}.staging[{i}]")
        for i, item in enumerate(staging_raw)
    ]
    s3 = [
        _validate_s3(r, r.table(item, f"{where}.s3[{i}]"), f"{where}.s3[{i}]")
        for i, item in enumerate(s3_raw)
    ]
    maintenance = _validate_maintenance(
        r, r.table(data.get("maintenance", {}), f"{where}.maintenance"), f"{where}.maintenance"
    )
    targets: list[tuple[str, str]] = [
        (f"{where}.staging[{i}]", s.target) for i, s in enumerate(staging) if s
    ] + [(f"{where}.s3[{i}]", s.target) for i, s in enumerate(s3) if s]
    for i, (wa, ta) in enumerate(targets):
        for wb, tb in targets[i + 1 :]:
            if targets_overlap(ta, tb):
                r.problems.append(
                    f"{wb}.target: {tb!r} overlaps {wa}.target {ta!r}; "
                    "two sources would fight over the same files"
                )
    if not name:
        return None
    return RepositoryConfig(
        name=name,
        quiet_seconds=quiet,
        max_batch_seconds=max_age,
        max_batch_files=max_files,
        max_batch_bytes=r.size(data, "max_batch_bytes", where, 8 * 1024**3),
        retry_initial_seconds=r.duration(data, "retry_initial_seconds", where, 5.0),
        retry_max_seconds=r.duration(data, "retry_max_seconds", where, 600.0),
        staging=tuple(s for s in staging if s),
        s3=tuple(s for s in s3 if s),
        maintenance=maintenance,
    )


def validate(data: dict[str, Any], source_path: str = "") -> Config:
    """Given parsed TOML, return a Config; raise ConfigError listing every problem."""
    problems: list[str] = []
    r = _Reader(problems)
    r.unknown(data, "", {"daemon", "cvmfs", "repository"})
    problems[:] = [p.lstrip(".") for p in problems]
    dm = r.table(data.get("daemon", {}), "daemon")
    r.unknown(
        dm,
        "daemon",
        {
            "state_dir",
            "metrics_address",
            "log_level",
            "log_format",
            "stall_seconds",
            "rescan_seconds",
            "stop_timeout_seconds",
            "prepare_workers",
        },
    )
    state_dir = r.get(dm, "state_dir", "daemon", str, "/var/lib/cvmfs-syncd")
    if not state_dir.startswith("/"):
        problems.append(f"daemon.state_dir: must be an absolute path, got {state_dir!r}")
    address = r.get(dm, "metrics_address", "daemon", str, DEFAULT_METRICS_ADDRESS)
    if address and parse_address(address) is None:
        problems.append(f"daemon.metrics_address: expected HOST:PORT, got {address!r}")
    level = r.get(dm, "log_level", "daemon", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        problems.append(f"daemon.log_level: one of debug, info, warning, error; got {level!r}")
    log_format = r.get(dm, "log_format", "daemon", str, "auto")
    if log_format not in ("auto", "json", "console"):
        problems.append(f"daemon.log_format: one of auto, json, console; got {log_format!r}")
    workers = r.get(dm, "prepare_workers", "daemon", int, 2)
    if not 1 <= workers <= 64:
        problems.append(f"daemon.prepare_workers: must be from 1 to 64, got {workers!r}")
        workers = 2
    daemon = DaemonConfig(
        state_dir=Path(state_dir),
        metrics_address=address,
        log_level=level,
        log_format=log_format,
        stall_seconds=r.duration(dm, "stall_seconds", "daemon", 900.0),
        rescan_seconds=r.duration(dm, "rescan_seconds", "daemon", 300.0),
        stop_timeout_seconds=r.duration(dm, "stop_timeout_seconds", "daemon", 600.0),
        prepare_workers=workers,
    )
    cv = r.table(data.get("cvmfs", {}), "cvmfs")
    r.unknown(
        cv,
        "cvmfs",
        {
            "server_command",
            "swissknife_command",
            "config_dir",
            "transaction_timeout_seconds",
            "publish_timeout_seconds",
            "command_timeout_seconds",
        },
    )
    config_dir = r.get(cv, "config_dir", "cvmfs", str, "/etc/cvmfs")
    if not config_dir.startswith("/"):
        problems.append(f"cvmfs.config_dir: must be an absolute path, got {config_dir!r}")
    cvmfs = CvmfsConfig(
        server_command=r.command(cv, "server_command", "cvmfs", ("cvmfs_server",)),
        swissknife_command=r.command(cv, "swissknife_command", "cvmfs", ("cvmfs_swissknife",)),
        config_dir=Path(config_dir),
        transaction_timeout_seconds=r.duration(cv, "transaction_timeout_seconds", "cvmfs", 120.0),
        publish_timeout_seconds=r.duration(cv, "publish_timeout_seconds", "cvmfs", 1800.0),
        command_timeout_seconds=r.duration(cv, "command_timeout_seconds", "cvmfs", 600.0),
    )
    repos_raw = data.get("repository", [])
    if not isinstance(repos_raw, list):
        problems.append("repository: expected an array of tables ([[repository]])")
        repos_raw = []
    if not repos_raw:
        problems.append("repository: at least one [[repository]] is required")
    repos: list[RepositoryConfig] = []
    for i, item in enumerate(repos_raw):
        where = f"repository[{i}]"
        repo = _validate_repository(r, r.table(item, where), where)
        if repo is not None:
            repos.append(repo)
    seen: dict[str, int] = {}
    for i, repo in enumerate(repos):
        if repo.name in seen:
            problems.append(f"repository[{i}].name: {repo.name!r} is configured twice")
        seen.setdefault(repo.name, i)
    staged: list[tuple[str, Path]] = []
    for repo in repos:
        for s in repo.staging:
            for other_where, other in staged:
                if s.path == other or other in s.path.parents or s.path in other.parents:
                    problems.append(
                        f"{repo.name}: staging path {s.path} overlaps staging path {other} "
                        f"({other_where})"
                    )
            staged.append((repo.name, s.path))
            if daemon.state_dir == s.path or s.path in daemon.state_dir.parents:
                problems.append(f"{repo.name}: staging path {s.path} contains daemon.state_dir")
    if problems:
        raise ConfigError(problems, source_path or None)
    return Config(daemon=daemon, cvmfs=cvmfs, repositories=tuple(repos), source_path=source_path)


def parse_address(value: str) -> tuple[str, int] | None:
    """Given ``HOST:PORT`` (``[v6]:PORT`` too), return (host, port) or None if invalid."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    host = host.strip("[]")
    if not host:
        return None
    return host, int(port)
