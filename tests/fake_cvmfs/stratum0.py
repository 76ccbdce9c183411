"""Test-side handle on a fake CernVM-FS stratum 0 (see ``docs/fake-cvmfs.md``).

``FakeStratum0(root)`` creates an empty fake installation below ``root`` with an executable
``root/bin/cvmfs_server`` wrapper around ``cvmfs_server.py`` (the fake itself is the
``server`` package); tests drive it like the real
tool (``run(...)`` or the wrapper path handed to the code under test) and inspect the
result through the same view a CVMFS client has (``published_tree``, ``read_file``).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from tests.fake_cvmfs import server as engine
from tests.fake_cvmfs.server.faults import CALIBRATED_COSTS as CALIBRATED_COSTS  # noqa: PLC0414 (re-exported: set_costs's values)
from tests.fake_cvmfs.server.faults import (
    FaultAction,
    add_rule,
    clear_rules,
    costs_in_effect,
    pending_rules,
    write_costs,
)

FAKE_SCRIPT = (Path(__file__).parent / "cvmfs_server.py").resolve()

EntryType = Literal["file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"]

STATE_KEYS = (
    "in_transaction_lock",
    "is_publishing_lock",
    "mount_mode",
    "rdonly_mounted",
    "revision",
    "root_hash",
    "spool_files",
)


class RepoState(TypedDict):
    """A repository's state with the keys of the recordings' ``state_before/after``."""

    in_transaction_lock: bool
    is_publishing_lock: bool
    mount_mode: Literal["ro", "rw"] | None
    rdonly_mounted: bool
    revision: int | None
    root_hash: str | None
    spool_files: list[str] | None
    in_transaction_lock_content: NotRequired[str]


class FakeCvmfsError(RuntimeError):
    """A fake ``cvmfs_server`` call that a helper expected to succeed failed."""

    def __init__(self, args: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"cvmfs_server {shlex.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        self.result = result


class Chunk:
    """One chunk of a file: object hash (stored with a ``P`` suffix), offset and size."""

    __slots__ = ("hash", "offset", "size")

    def __init__(self, hash_: str, offset: int, size: int) -> None:
        self.hash = hash_
        self.offset = offset
        self.size = size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        return (self.hash, self.offset, self.size) == (other.hash, other.offset, other.size)

    def __hash__(self) -> int:
        return hash((self.hash, self.offset, self.size))

    def __repr__(self) -> str:
        return f"Chunk({self.hash!r}, {self.offset}, {self.size})"


class Entry:
    """What a client sees at one path of a published revision.

    ``content`` holds a file's bytes read through the client view, or None for directories,
    symlinks and files the client cannot read (``error`` then holds the errno, e.g. EIO).
    ``hash``/``compression``/``chunks``/``grafted`` describe the catalog's content reference.
    """

    __slots__ = (
        "chunks",
        "compression",
        "content",
        "error",
        "grafted",
        "hash",
        "mode",
        "mtime",
        "size",
        "target",
        "type",
    )

    def __init__(
        self,
        type_: EntryType,
        mode: int,
        size: int,
        mtime: int,
        *,
        content: bytes | None = None,
        target: str | None = None,
        error: int | None = None,
        hash_: str | None = None,
        compression: str | None = None,
        chunks: tuple[Chunk, ...] = (),
        grafted: bool = False,
    ) -> None:
        self.type: EntryType = type_
        self.mode = mode
        self.size = size
        self.mtime = mtime
        self.content = content
        self.target = target
        self.error = error
        self.hash = hash_
        self.compression = compression
        self.chunks = chunks
        self.grafted = grafted

    def __repr__(self) -> str:
        detail = self.target if self.type == "symlink" else self.content
        if isinstance(detail, bytes) and len(detail) > 40:
            detail = detail[:40] + b"..."
        return f"Entry({self.type}, {oct(self.mode)}, size={self.size}, {detail!r})"


def _entry_type(kind: str) -> EntryType:
    kinds: tuple[EntryType, ...] = (
        "file",
        "dir",
        "fifo",
        "socket",
        "chardev",
        "blockdev",
    )
    return next((known for known in kinds if known == kind), "symlink")


class FakeStratum0:
    """A fake stratum 0 below ``root``: config, union dirs, spools, storage and faults."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_dir: Path = self.root / "etc" / "cvmfs"
        (self.config_dir / "repositories.d").mkdir(parents=True, exist_ok=True)
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        self.server_command: Path = bin_dir / "cvmfs_server"
        wrapper = (
            "#!/bin/sh\n"
            f"exec {shlex.quote(sys.executable)} -S {shlex.quote(str(FAKE_SCRIPT))} "
            f'--root {shlex.quote(str(self.root))} "$@"\n'
        )
        self.server_command.write_text(wrapper)
        self.server_command.chmod(0o755)

    # -- running the fake -------------------------------------------------------------
    def run(
        self,
        *args: str,
        stdin: bytes = b"",
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
        umask: int = 0o022,
    ) -> subprocess.CompletedProcess[str]:
        """Run the fake ``cvmfs_server`` with ``args``; never raises on a non-zero exit.

        ``umask`` is the command's umask (022 as the daemon sets it, whatever the test
        runner's own is; faults.md F4: objects written under 027 break publish).
        """
        result = subprocess.run(
            [str(self.server_command), *args],
            input=stdin,
            capture_output=True,
            cwd=str(cwd or self.root),
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
            umask=umask,
        )
        return subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode("utf-8", "surrogateescape"),
            result.stderr.decode("utf-8", "surrogateescape"),
        )

    def check_run(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        """Run the fake and raise ``FakeCvmfsError`` unless it exits 0."""
        result = self.run(*args, stdin=stdin)
        if result.returncode != 0:
            raise FakeCvmfsError(list(args), result)
        return result

    def mkfs(
        self,
        repo: str,
        *,
        gc: bool = False,
        auto_tag: bool | None = None,
        owner: str | None = None,
        hash_algorithm: str | None = None,
        compression: str | None = None,
        s3_config: Path | None = None,
        stratum0_url: str | None = None,
    ) -> None:
        """Create a repository with the fake's ``mkfs`` (``-z`` when ``gc``).

        ``auto_tag`` None keeps the recorded default (CVMFS_AUTO_TAG=true); ``s3_config``
        makes an S3-type repository whose storage is a local directory standing in for the
        bucket (``stratum0_url`` is then the ``-w`` URL).
        """
        args = ["mkfs", "-o", owner or engine.current_user()]
        if gc:
            args.append("-z")
        if auto_tag is False:
            args.append("-g")
        if hash_algorithm:
            args += ["-a", hash_algorithm]
        if compression:
            args += ["-Z", compression]
        if s3_config is not None:
            args += ["-s", str(s3_config), "-w", stratum0_url or "http://127.0.0.1:9000/bucket"]
        elif stratum0_url:
            args += ["-w", stratum0_url]
        self.check_run(*args, repo)

    # -- locations --------------------------------------------------------------------
    def repository(self, repo: str) -> engine.Repo:
        """The engine's view of a repository (paths, configuration, storage)."""
        return engine.Repo(self.root, repo)

    def union_dir(self, repo: str) -> Path:
        """The union directory (the fake's ``/cvmfs/<repo>``)."""
        return self.repository(repo).union

    def spool_dir(self, repo: str) -> Path:
        """The spool directory (the fake's ``/var/spool/cvmfs/<repo>``)."""
        return self.repository(repo).spool

    def storage_dir(self, repo: str) -> Path:
        """The storage directory (the fake's ``/srv/cvmfs/<repo>``)."""
        return self.repository(repo).storage

    def server_conf(self, repo: str) -> Path:
        """The repository's ``server.conf``."""
        return self.repository(repo).server_conf

    def object_path(self, repo: str, name: str) -> Path:
        """Where storage object ``name`` (hash plus suffixes) lives."""
        return self.repository(repo).object_file(name)

    # -- configuration ----------------------------------------------------------------
    def config(self, repo: str) -> dict[str, str]:
        """The parsed ``server.conf``."""
        return dict(self.repository(repo).conf)

    def set_config(self, repo: str, key: str, value: str) -> None:
        """Set (or add) one ``server.conf`` key, as an administrator would with sed."""
        path = self.server_conf(repo)
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.split("=", 1)[0] == key:
                lines[index] = f"{key}={value}"
                break
        else:
            lines.append(f"{key}={value}")
        path.write_text("\n".join(lines) + "\n")

    # -- state ------------------------------------------------------------------------
    def state(self, repo: str) -> RepoState:
        """The repository state with the keys of the recordings' ``state_before/after``."""
        handle = self.repository(repo)
        spool = handle.spool
        exists = handle.exists()
        mount = handle.mount_state() if exists else {}
        lock = spool / "in_transaction.lock"
        state: RepoState = {
            "in_transaction_lock": lock.exists(),
            "is_publishing_lock": (spool / "is_publishing.lock").exists(),
            "mount_mode": None,
            "rdonly_mounted": bool(mount.get("rdonly_mounted")),
            "revision": None,
            "root_hash": None,
            "spool_files": sorted(os.listdir(spool)) if spool.is_dir() else None,
        }
        if mount.get("union_mounted"):
            state["mount_mode"] = "rw" if mount.get("union_rw") else "ro"
        if lock.exists():
            state["in_transaction_lock_content"] = lock.read_text()
        try:
            manifest = handle.manifest()
        except (OSError, ValueError, KeyError):
            return state
        state["revision"] = manifest.revision
        state["root_hash"] = manifest.root_hash
        return state

    def revision(self, repo: str) -> int:
        """The published revision (manifest field ``S``)."""
        return self.repository(repo).manifest().revision

    def root_hash(self, repo: str) -> str:
        """The published root catalog hash (manifest field ``C``)."""
        return self.repository(repo).manifest().root_hash

    def revisions(self, repo: str) -> list[int]:
        """Every revision ever published (including mkfs's empty revision 0)."""
        return [int(r["revision"]) for r in self.repository(repo).revisions()]

    def tags(self, repo: str) -> dict[str, int]:
        """Tag name -> revision, from the tag database the manifest references."""
        return {str(t["name"]): int(t["revision"]) for t in self.repository(repo).tags()}

    def add_tags(self, repo: str, names: list[str], *, description: str = "") -> None:
        """Add named tags of the published revision in one tag-database write.

        Stands in for thousands of publishes' automatic tags (faults.md F1, F2) without
        running them; like ``tag -a``, a name that exists already raises ValueError.
        """
        handle = self.repository(repo)
        tags = handle.tags()
        existing = {str(t.get("name")) for t in tags}
        trunk = next(t for t in tags if t.get("name") == "trunk")
        for name in names:
            if name in existing or name in ("trunk", "trunk-previous"):
                raise ValueError(f"tag {name!r} exists already")
            existing.add(name)
            tags.append(dict(trunk, name=name, description=description, branch=""))
        manifest = handle.manifest()
        manifest.history = engine.store_history(handle, tags)
        manifest.reflog = engine.record_refs(handle, [(manifest.history, 2)], self.now())
        handle.write_manifest(manifest)

    def whitelist_expiry(self, repo: str) -> float | None:
        """Expiry of ``.cvmfswhitelist`` (UNIX seconds; None when its E line is broken)."""
        return self.repository(repo).whitelist().expiry()

    def in_transaction(self, repo: str) -> bool:
        """Whether ``in_transaction.lock`` exists."""
        return self.repository(repo).in_transaction()

    # -- client view --------------------------------------------------------------------
    def catalog(self, repo: str, revision: int | None = None) -> engine.Catalog:
        """The fake catalog of a revision (raises FileNotFoundError when garbage-collected)."""
        handle = self.repository(repo)
        if revision is None:
            return handle.catalog(handle.manifest().root_hash)
        for record in handle.revisions():
            if int(record["revision"]) == revision:
                try:
                    return handle.catalog(str(record["root_hash"]))
                except FileNotFoundError:
                    raise FileNotFoundError(
                        errno.ENOENT, f"revision {revision} of {repo} was garbage-collected"
                    ) from None
        raise FileNotFoundError(errno.ENOENT, f"{repo} has no revision {revision}")

    def published_tree(self, repo: str, revision: int | None = None) -> dict[str, Entry]:
        """Every path of a revision (relative, no leading slash; the root is left out)."""
        handle = self.repository(repo)
        tree: dict[str, Entry] = {}
        for path, item in sorted(self.catalog(repo, revision).entries.items()):
            if path == "/":
                continue
            content: bytes | None = None
            error: int | None = None
            if item.kind == "file":
                try:
                    content = engine.read_file_content(handle, item)
                except OSError as exc:
                    error = exc.errno or errno.EIO
            tree[path[1:]] = Entry(
                _entry_type(item.kind),
                item.mode,
                item.size,
                item.mtime,
                content=content,
                target=item.target,
                error=error,
                hash_=item.hash,
                compression=item.compression if item.kind == "file" else None,
                chunks=tuple(Chunk(*c) for c in item.chunks),
                grafted=item.graft,
            )
        return tree

    def read_file(self, repo: str, path: str, revision: int | None = None) -> bytes:
        """Read a file as a client would; raises ``OSError(EIO)`` where the client fails.

        Relative symlinks inside the repository are followed; a missing path raises
        FileNotFoundError and a directory IsADirectoryError.
        """
        handle = self.repository(repo)
        entries = self.catalog(repo, revision).entries
        current = "/" + path.strip("/")
        for _ in range(16):
            item = entries.get(current)
            if item is None:
                raise FileNotFoundError(errno.ENOENT, f"{current} not in {repo}", path)
            if item.kind == "dir":
                raise IsADirectoryError(errno.EISDIR, f"{current} is a directory", path)
            if item.kind == "file":
                return engine.read_file_content(handle, item)
            if item.kind != "symlink":
                raise OSError(errno.EINVAL, f"{current} is not a regular file", path)
            target = item.target or ""
            if target.startswith("/"):
                union = str(handle.union)
                if not target.startswith(union + "/"):
                    raise FileNotFoundError(errno.ENOENT, f"{target} is outside {repo}", path)
                current = target[len(union) :]
            else:
                current = os.path.normpath(os.path.join(os.path.dirname(current), target))
        raise OSError(errno.ELOOP, "too many levels of symbolic links", path)

    # -- faults, clock, mounts ----------------------------------------------------------
    def inject_fault(
        self,
        command: str,
        action: FaultAction,
        *,
        at: str = "start",
        repo: str | None = None,
        exit_code: int | None = None,
        stdout: str | None = None,
        stderr: str | None = None,
        times: int | None = None,
        delay: float | None = None,
    ) -> None:
        """Add a rule to ``fake-faults.json`` (see docs/fake-cvmfs.md for the vocabulary).

        ``command`` is a subcommand ("publish", ...), "*" for any, or "storage" for the
        storage condition (actions "unreachable" / "hang"). ``times`` limits how often the
        rule fires (None = until cleared).
        """
        add_rule(
            self.root,
            command,
            action,
            at=at,
            repo=repo,
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            times=times,
            delay=delay,
        )

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        clear_rules(self.root)

    def faults(self) -> list[dict[str, object]]:
        """The rules still pending (rules with ``times`` disappear once used up)."""
        return pending_rules(self.root)

    def set_clock(self, timestamp: float | None) -> None:
        """Freeze the fake's clock at ``timestamp`` (None: back to the real clock)."""
        clock = self.root / "fake-clock"
        if timestamp is None:
            clock.unlink(missing_ok=True)
        else:
            engine.write_atomic(clock, repr(float(timestamp)).encode())

    def set_clock_offset(self, seconds: float) -> None:
        """Let the fake's clock run ``seconds`` ahead of (or behind) the real clock."""
        engine.write_atomic(self.root / "fake-clock", f"{float(seconds):+}".encode())

    def set_costs(self, costs: Mapping[str, Mapping[str, float]] | None) -> None:
        """Make ``transaction``/``publish`` last at least their calibrated duration.

        ``costs`` maps a command to seconds by key (``CALIBRATED_COSTS`` has the values
        measured on the real tool); None removes ``fake-costs.json`` (no padding, the
        default). Unknown commands or keys and negative values raise ValueError.
        """
        write_costs(self.root, costs)

    def costs(self) -> dict[str, dict[str, float]]:
        """The costs in effect (empty when none are set)."""
        return costs_in_effect(self.root)

    def now(self) -> float:
        """The fake's current time."""
        return engine.fake_now(self.root)

    def unmount(self, repo: str, *, union: bool = True, rdonly: bool = False) -> None:
        """Make the union and/or the rdonly mount disappear (a stale mount, l_stale_mount)."""
        handle = self.repository(repo)
        changes: dict[str, bool] = {}
        if union:
            changes["union_mounted"] = False
            changes["union_rw"] = False
        if rdonly:
            changes["rdonly_mounted"] = False
        handle.set_mount_state(**changes)

    def violations(self) -> list[str]:
        """Lines of ``fake-violations.log`` (changes to a union dir outside a transaction)."""
        try:
            return (self.root / "fake-violations.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def scan_violations(self, repo: str) -> list[str]:
        """Check a union directory for changes outside a transaction now; return the log."""
        self.run("mount", repo)
        return self.violations()

    def orphans(self) -> list[int]:
        """PIDs of fake processes still running below this root (e.g. ``transaction -t``)."""
        pids: list[int] = []
        marker = f"--root\0{self.root}\0"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(FAKE_SCRIPT) in cmdline and marker in cmdline:
                pids.append(int(entry.name))
        return pids

    def kill_orphans(self, timeout: float = 5.0) -> None:
        """SIGKILL every fake process still running below this root and wait for them."""
        for pid in self.orphans():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + timeout
        while self.orphans() and time.monotonic() < deadline:
            time.sleep(0.01)

    def write_graft(
        self,
        repo: str,
        path: str,
        *,
        size: int,
        checksum: str,
        compression: str | None = "none",
        chunks: list[tuple[int, str]] | None = None,
        placeholder: bytes = b"",
        mode: int = 0o644,
    ) -> None:
        """Write a placeholder and its ``.cvmfsgraft-<name>`` into the open transaction."""
        target = self.union_dir(repo) / path.strip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(placeholder)
        target.chmod(mode)
        lines = [f"size={size}", f"checksum={checksum}"]
        if compression is not None:
            lines.append(f"compression={compression}")
        if chunks:
            lines.append("chunk_offsets=" + ",".join(str(o) for o, _ in chunks))
            lines.append("chunk_checksums=" + ",".join(h for _, h in chunks))
        marker = target.with_name(f".cvmfsgraft-{target.name}")
        marker.write_text("\n".join(lines) + "\n")

    def put_object(self, repo: str, name: str, payload: bytes) -> Path:
        """Place an object into the storage by hand (as a graft uploader would)."""
        path = self.object_path(repo, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        path.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        return path

    def last_gc(self, repo: str) -> float | None:
        """``last_gc`` of the storage's ``.cvmfs_status.json`` as a timestamp (None: none yet)."""
        status = engine.read_json(self.storage_dir(repo) / ".cvmfs_status.json", {})
        text = status.get("last_gc") if isinstance(status, dict) else None
        return engine.parse_last_gc(str(text)) if text else None

    def manifest_fields(self, repo: str) -> dict[str, str]:
        """The text fields of ``.cvmfspublished`` by letter."""
        data = (self.storage_dir(repo) / ".cvmfspublished").read_bytes()
        return {line[0]: line[1:] for line in engine.text_part(data).splitlines() if line}

    def debug_state(self, repo: str) -> str:
        """A JSON dump of the state, for assertion messages."""
        return json.dumps(self.state(repo), indent=2, sort_keys=True)
