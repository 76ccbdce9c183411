"""TOML configuration: loading, validation (every error at once, with its key path), values.

Each key is declared once, as a field of the frozen dataclass of its table (see
:mod:`cvmfs_syncd.config.schema`): type, default, unit, documentation, check. Validation,
the unknown-key check and the key list of the reference file ``config/cvmfs-syncd.toml``
(a test keeps them in step) are derived from these fields. To add a key, add a field.

Loading and validating are separate steps so that a reload can validate a new file first
and swap it in only when it is valid.
"""

# ruff: noqa: RUF009 - key(), required(), subtable() and tables() return dataclasses.field()

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from cvmfs_syncd.config.schema import (
    Check,
    Declared,
    Key,
    Reader,
    cross_check,
    declared_keys,
    declared_tables,
    key,
    required,
    subtable,
    tables,
)
from cvmfs_syncd.config.units import parse_command, parse_duration, parse_size
from cvmfs_syncd.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_IGNORE",
    "DEFAULT_METRICS_ADDRESS",
    "Config",
    "CvmfsConfig",
    "DaemonConfig",
    "Declared",
    "Key",
    "LogFormat",
    "LogLevel",
    "MaintenanceConfig",
    "RepositoryConfig",
    "S3Config",
    "SourceMode",
    "StagingConfig",
    "TarballMode",
    "declared_keys",
    "declared_tables",
    "load",
    "load_file",
    "normalise_target",
    "parse_address",
    "parse_command",
    "parse_duration",
    "parse_size",
    "targets_overlap",
    "validate",
]

DEFAULT_CONFIG_PATH = "/etc/cvmfs-syncd/cvmfs-syncd.toml"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9477"
DEFAULT_IGNORE = ("*.tmp", "*.part", ".*.swp", ".*.swx", "*~", ".~lock.*#", ".nfs*")

_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CRON_FIELD = re.compile(r"^[\d*,/\-A-Za-z]+$")

SourceMode = Literal["mirror", "inbox"]
TarballMode = Literal["files", "ingest"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


def parse_address(value: str) -> tuple[str, int] | None:
    """Given ``HOST:PORT`` (``[v6]:PORT`` too), return (host, port) or None if invalid."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    host = host.strip("[]")
    if not host:
        return None
    return host, int(port)


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


# -- checks of single keys ----------------------------------------------------------------


def _within(low: float, high: float | None = None, unit: str = "") -> Check:
    """A check that a number is at least ``low`` (and at most ``high``)."""

    def check(value: Any) -> Any:
        if value < low or (high is not None and value > high):
            span = f"at least {low}{unit}" if high is None else f"from {low} to {high}{unit}"
            raise ValueError(f"must be {span}, got {value!r}")
        return value

    return check


def _address(value: str) -> str:
    if value and parse_address(value) is None:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def _repo_name(value: str) -> str:
    if not _REPO_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a repository name")
    return value


def _target(value: str) -> str:
    target = normalise_target(value)
    if target is None:
        raise ValueError(f"must be an absolute path without '..', got {value!r}")
    return target


def _file_name(value: str) -> str:
    if value and ("/" in value or value in (".", "..") or "\0" in value):
        raise ValueError(f"must be a plain file name, got {value!r}")
    return value


def _share(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value!r}")
    return value


def _key_prefix(value: str) -> str:
    if value.startswith("/"):
        raise ValueError(f"S3 keys do not start with '/', got {value!r}")
    return value


def _endpoint(value: str) -> str:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"expected http(s)://host[:port], got {value!r}")
    return value


def _crontab(value: str) -> str:
    words = value.split()
    if value and (len(words) != 5 or not all(map(_CRON_FIELD.match, words))):
        raise ValueError(f"expected 5 crontab fields, got {value!r}")
    return value


# -- the tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[daemon]`` table."""

    state_dir: Path = key(Path("/var/lib/cvmfs-syncd"), "journal, index, S3 listings, locks")
    metrics_address: str = key(
        DEFAULT_METRICS_ADDRESS,
        "HOST:PORT of /metrics, /status, /healthz; '' disables",
        check=_address,
    )
    log_level: LogLevel = key("info", "least severe level logged", fold_case=True)
    log_format: LogFormat = key("auto", "json for journald, console, auto: console on a TTY")
    stall_seconds: float = key(900.0, "no progress this long stops watchdog pings", unit="duration")
    rescan_seconds: float = key(300.0, "interval of full reconciliation scans", unit="duration")
    stop_timeout_seconds: float = key(
        600.0, "on SIGTERM, how long an in-flight publish may still take", unit="duration"
    )
    prepare_workers: int = key(2, "threads preparing file content", check=_within(1, 64))


@dataclass(frozen=True)
class CvmfsConfig:
    """The ``[cvmfs]`` table: how to reach the CVMFS tools and configuration."""

    server_command: tuple[str, ...] = key(("cvmfs_server",), "cvmfs_server", unit="command")
    swissknife_command: tuple[str, ...] = key(
        ("cvmfs_swissknife",), "cvmfs_swissknife", unit="command"
    )
    config_dir: Path = key(Path("/etc/cvmfs"), "holds repositories.d/<repo>/server.conf")
    transaction_timeout_seconds: float = key(120.0, "limit of a transaction", unit="duration")
    publish_timeout_seconds: float = key(1800.0, "limit of a publish", unit="duration")
    command_timeout_seconds: float = key(600.0, "limit of other commands", unit="duration")
    lease_seconds: float = key(
        600.0, "gateway lease length until one is read from the gateway", unit="duration"
    )
    ingest_inactivity_seconds: float = key(
        300.0, "stop an ingest that reads and prints nothing this long", unit="duration"
    )


@dataclass(frozen=True, kw_only=True)
class TarballKeys:
    """The tarball keys every source table has (``tarballs = "ingest"``), declared once."""

    tarballs: TarballMode = key("files", "ingest: a top-level tarball becomes a directory")
    ingest_catalog: bool = key(True, "a nested catalog at each tarball's directory")
    max_ingest_bytes: int = key(
        32 * 1024**3, "most content of one tarball", unit="size", check=_within(1)
    )
    max_ingest_members: int = key(250_000, "most entries of one tarball", check=_within(1))
    allow_absolute_symlinks: bool = key(False, "tarball symlinks may point to absolute paths")


@dataclass(frozen=True)
class StagingConfig(TarballKeys):
    """One ``[[repository.staging]]`` source."""

    path: Path = required("the staging directory")
    target: str = key("/", "directory inside the repository", check=_target)
    mode: SourceMode = key("mirror", "mirror: deletes propagate; inbox: published files leave")
    settle_seconds: float = key(2.0, "a file must be unchanged this long", unit="duration")
    ready_marker: str = key(
        "", "publish a top-level directory once it holds this file", check=_file_name
    )
    ignore: tuple[str, ...] = key(DEFAULT_IGNORE, "glob patterns of names never published")
    allow_reserved_names: bool = key(False, "publish .cvmfscatalog, .cvmfsdirtab, ...")
    graft_threshold: int = key(0, "files this large are grafted; 0: never", unit="size")
    max_delete_share: float = key(0.5, "hold a batch deleting more of a target", check=_share)
    prepare: bool = key(True, "store small files' objects before the transaction opens")

    @property
    def name(self) -> str:
        """A stable, human-readable source name (used in logs, metrics and the journal)."""
        return f"staging:{self.path}"


@dataclass(frozen=True)
class S3Config(TarballKeys):
    """One ``[[repository.s3]]`` source."""

    bucket: str = required("the bucket")
    prefix: str = key("", "keys under it map to paths under target", check=_key_prefix)
    target: str = key("/", "directory inside the repository", check=_target)
    endpoint_url: str = key("", "http(s)://host[:port]; '' for AWS", check=_endpoint)
    region: str = key("", "the bucket's region; '' for the default")
    credentials_file: Path | None = key(None, "AWS shared-credentials file, mode 0600")
    profile: str = key("default", "section of credentials_file")
    poll_seconds: float = key(
        30.0, "listing interval", unit="duration", check=_within(1, None, "s")
    )
    mode: SourceMode = key("mirror", "mirror: deletes propagate; inbox: live objects are deleted")
    ready_marker: str = key(
        "", "publish a top-level directory once it holds this key", check=_file_name
    )
    copy_below: int = key(1024 * 1024, "larger objects are grafted", unit="size")
    max_delete_share: float = key(0.5, "hold a batch deleting more of a target", check=_share)
    allow_reserved_names: bool = key(False, "publish .cvmfscatalog, .cvmfsdirtab, ...")
    prepare: bool = key(True, "store small objects before the transaction opens")

    @property
    def name(self) -> str:
        """A stable, human-readable source name."""
        return f"s3:{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class MaintenanceConfig:
    """The ``[repository.maintenance]`` table."""

    resign_before_expiry_seconds: float = key(
        7 * 86400.0,
        "re-sign the whitelist when less than this remains",
        unit="duration",
        toml="resign_before_expiry",
    )
    resign_days: int = key(30, "validity of a new whitelist in days", check=_within(1, 365))
    gc_schedule: str = key("", "crontab expression; '' disables", check=_crontab)
    gc_keep_seconds: float | None = key(
        None, "keep revisions younger than this", unit="duration", toml="gc_keep"
    )
    gc_keep_revisions: int | None = key(None, "keep this many revisions", check=_within(1))
    auto_tag_keep_seconds: float | None = key(
        None, "remove older automatic tags before gc", unit="duration", toml="auto_tag_keep"
    )
    tag_cleanup_seconds: float = key(
        600.0, "limit of removing old automatic tags; gc runs after it", unit="duration"
    )
    check_schedule: str = key("", "crontab expression; '' disables", check=_crontab)
    check_integrity: bool = key(False, "check -i: read every object")


@dataclass(frozen=True)
class RepositoryConfig:
    """One ``[[repository]]``."""

    name: str = required("the repository's fully qualified name", check=_repo_name)
    quiet_seconds: float = key(5.0, "cut a batch after this long without changes", unit="duration")
    max_batch_seconds: float = key(60.0, "… or when its oldest change is this old", unit="duration")
    max_batch_files: int = key(50000, "… or when this many paths are pending", check=_within(1))
    max_batch_bytes: int = key(8 * 1024**3, "content of one revision at most", unit="size")
    retry_initial_seconds: float = key(5.0, "first back-off after a failure", unit="duration")
    retry_max_seconds: float = key(600.0, "longest back-off", unit="duration")
    staging: tuple[StagingConfig, ...] = tables("staging directories")
    s3: tuple[S3Config, ...] = tables("S3 prefixes")
    maintenance: MaintenanceConfig = subtable(MaintenanceConfig, "re-signing, gc and check")


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    daemon: DaemonConfig = subtable(DaemonConfig, "the daemon process")
    cvmfs: CvmfsConfig = subtable(CvmfsConfig, "the CVMFS tools")
    repositories: tuple[RepositoryConfig, ...] = tables(
        "the repositories published to", toml="repository", nonempty=True
    )
    source_path: str = ""  # not a key: the file this was loaded from

    def repository(self, name: str) -> RepositoryConfig:
        """Return the repository named ``name``; raise KeyError if there is none."""
        for repo in self.repositories:
            if repo.name == name:
                return repo
        raise KeyError(name)


# -- checks between keys -------------------------------------------------------------------


@cross_check(MaintenanceConfig)
def _maintenance(r: Reader, m: MaintenanceConfig, where: str) -> None:
    if m.resign_before_expiry_seconds >= m.resign_days * 86400:
        r.problems.append(
            f"{where}.resign_before_expiry: must be shorter than resign_days "
            f"({m.resign_days}d), or every check would re-sign"
        )
    if m.gc_keep_seconds is not None and m.gc_keep_revisions is not None:
        r.problems.append(f"{where}: gc_keep and gc_keep_revisions are exclusive; set one")


@cross_check(RepositoryConfig)
def _repository(r: Reader, repo: RepositoryConfig, where: str) -> None:
    if repo.max_batch_seconds < repo.quiet_seconds:
        r.problems.append(f"{where}.max_batch_seconds: must not be shorter than quiet_seconds")
    sources: list[StagingConfig | S3Config] = [*repo.staging, *repo.s3]
    for i, a in enumerate(sources):
        for b in sources[i + 1 :]:
            if targets_overlap(a.target, b.target):
                r.problems.append(
                    f"{r.at(b)}.target: {b.target!r} overlaps {r.at(a)}.target {a.target!r}; "
                    "two sources would fight over the same files"
                )


@cross_check(Config)
def _whole(r: Reader, config: Config, _where: str) -> None:
    seen: set[str] = set()
    for repo in config.repositories:
        if repo.name in seen:
            r.problems.append(f"{r.at(repo)}.name: {repo.name!r} is configured twice")
        seen.add(repo.name)
    staged: list[tuple[str, Path]] = []
    state_dir = config.daemon.state_dir
    for repo in config.repositories:
        for s in repo.staging:
            for other_where, other in staged:
                if s.path == other or other in s.path.parents or s.path in other.parents:
                    r.problems.append(
                        f"{repo.name}: staging path {s.path} overlaps staging path {other} "
                        f"({other_where})"
                    )
            staged.append((repo.name, s.path))
            if state_dir == s.path or s.path in state_dir.parents:
                r.problems.append(f"{repo.name}: staging path {s.path} contains daemon.state_dir")


# -- loading -------------------------------------------------------------------------------


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


def validate(data: dict[str, Any], source_path: str = "") -> Config:
    """Given parsed TOML, return a Config; raise ConfigError listing every problem."""
    r = Reader()
    config = r.table(Config, data, "")
    if r.problems or config is None:
        raise ConfigError(r.problems, source_path or None)
    return replace(config, source_path=source_path)
