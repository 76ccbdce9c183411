#!/usr/bin/env python3
"""A stateful stand-in for the CernVM-FS 2.12 ``cvmfs_server`` command.

Usage: ``cvmfs_server.py --root ROOT <subcommand> [options] <repository>``.

Everything the fake touches lives below ROOT: the configuration (``ROOT/etc/cvmfs``), the
union directory (``ROOT/cvmfs/<repo>``, a plain directory), the spool
(``ROOT/var/spool/cvmfs/<repo>``), the storage (``ROOT/srv/cvmfs/<repo>``) and the fake's
own bookkeeping (``ROOT/fake``).  Exit codes, the stdout/stderr split and the messages
follow the recordings in ``cvmfs-reference/transcripts``; ``docs/fake-cvmfs.md`` lists what
is modelled, what is not, and which recording each behaviour comes from.

The module is stdlib-only so that it starts quickly; ``stratum0.py`` imports it to share
the storage formats (manifest, catalog, objects) and the client view.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import signal
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

# --------------------------------------------------------------------------------------
# Recorded texts (data the fake reproduces)
# --------------------------------------------------------------------------------------

CREATOR_VERSION = "143"
NULL_HEX = "0" * 40
EMPTY_PATH_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
CATALOG_TTL = 240
GC_DEFAULT_TIMESPAN = 3 * 86400
AUTO_GC_DEFAULT_LAPSE = "1 day ago"
AUTO_GC_DEFAULT_TIMESPAN = "3 days ago"
LAST_GC_FORMAT = "%a %b %e %H:%M:%S UTC %Y"
MASTER_REPLICA_TEXT = "This file marks the repository as replicatable to stratum 1 servers\n"
SOURCE_PLACEHOLDER = "<cvmfs-src>"

FUSE_CHATTER = (
    "CernVM-FS: running with suid support\n"
    "Failed to set requested number of open files, using maximum number 20000\n"
    "CernVM-FS: loading Fuse module... done\n"
    "CernVM-FS: mounted cvmfs on {rdonly}\n"
)

TRACE_REPOSITORY = (
    "\n"
    "Stacktrace:\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xdb4ae) [0x7f0000adb4ae]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xe4fcb) [0x7f0000ae4fcb]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0x2c409) [0x7f0000a2c409]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish10RepositoryC2ERKNS_18SettingsRepositoryEb"
    "+0x65e) [0x7f0000ae210e]\n"
    "/usr/bin/cvmfs_publish(+0x61bca) [0x550000032bca]\n"
    "/usr/bin/cvmfs_publish(+0x1a9b4) [0x55000000b9b4]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f000004524a]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(__libc_start_main+0x85) [0x7f0000045305]\n"
    "/usr/bin/cvmfs_publish(+0x1aaa1) [0x55000000baa1]\n"
    "\n"
)
TRACE_PUBLISHER = (
    "\n"
    "Stacktrace:\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xdb4ae) [0x7f0000adb4ae]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xe4fcb) [0x7f0000ae4fcb]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0x2c409) [0x7f0000a2c409]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish10RepositoryC2ERKNS_18SettingsRepositoryEb"
    "+0x65e) [0x7f0000ae210e]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish9PublisherC1ERKNS_17SettingsPublisherEb"
    "+0x48) [0x7f0000ae2378]\n"
    "/usr/bin/cvmfs_publish(+0x4b11a) [0x55000000011a]\n"
    "/usr/bin/cvmfs_publish(+0x1a9b4) [0x55000000b9b4]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f000004524a]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(__libc_start_main+0x85) [0x7f0000045305]\n"
    "/usr/bin/cvmfs_publish(+0x1aaa1) [0x55000000baa1]\n"
    "\n"
)
TRACE_TRANSACTION = (
    "\n"
    "Stacktrace:\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xdb4ae) [0x7f0000adb4ae]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xe4fcb) [0x7f0000ae4fcb]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0x305d1) [0x7f00004305d1]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish9Publisher11TransactionEv+0x11) "
    "[0x7f00004e10a1]\n"
    "/usr/bin/cvmfs_publish(+0x6b629) [0x55000006e629]\n"
    "/usr/bin/cvmfs_publish(+0x1a9b4) [0x55000001d9b4]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f000004524a]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(__libc_start_main+0x85) [0x7f0000045305]\n"
    "/usr/bin/cvmfs_publish(+0x1aaa1) [0x55000001daa1]\n"
    "\n"
)

MKFS_TAIL = (
    "\n"
    "Before you can install anything, call `cvmfs_server transaction`\n"
    "to enable write access on your repository. Then install your\n"
    "software in {union} as user {user}.\n"
    "Once you're happy, publish using `cvmfs_server publish`\n"
    "\n"
    "For client configuration, have a look at 'cvmfs_server info'\n"
    "\n"
    "If you go for production, backup your masterkey from {keys}/!\n"
)

META_INFO_TEXT = (
    "{\n"
    '  "administrator" : "Your Name",\n'
    '  "email"         : "you@example.org",\n'
    '  "organisation"  : "Your Organisation",\n'
    '  "description"   : "Repository content",\n'
    '  "url"           : "https://example.org",\n'
    '  "recommended-stratum0":  "http://stratum0.example.org/cvmfs/<repo>",\n'
    '  "recommended-stratum1s" : []\n'
    "}\n"
)

SPOOL_DIRS = (
    "cache",
    "ofs_workdir/work",
    "ovl_work",
    "rdonly",
    "scratch/current",
    "scratch/wastebin",
    "tmp",
)

ALGORITHMS = ("sha1", "rmd160", "shake128")
HASH_RE = re.compile(r"^([0-9a-f]{40})(-rmd160|-shake128)?$")
OBJECT_NAME_RE = re.compile(r"^([0-9a-f]{40})(-rmd160|-shake128)?([CPHXML]?)$")
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


class OptionError(Exception):
    """A command line that does not match a subcommand's options."""


def parse_options(args: list[str], spec: str) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU-style short options: ``spec`` as for getopt (``"m:f"``); options may follow operands."""
    takes_value = {c for i, c in enumerate(spec) if c != ":" and spec[i + 1 : i + 2] == ":"}
    known = {c for c in spec if c != ":"}
    opts: list[tuple[str, str]] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            rest.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            rest.append(arg)
            continue
        position = 1
        while position < len(arg):
            letter = arg[position]
            position += 1
            if letter not in known:
                raise OptionError(f"invalid option -- '{letter}'")
            if letter not in takes_value:
                opts.append((f"-{letter}", ""))
                continue
            if position < len(arg):
                opts.append((f"-{letter}", arg[position:]))
            elif index < len(args):
                opts.append((f"-{letter}", args[index]))
                index += 1
            else:
                raise OptionError(f"option requires an argument -- '{letter}'")
            break
    return opts, rest


class CommandExit(Exception):
    """Raised to end a subcommand with an exit code (after its output was written)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def read_json(path: Path, default: Any) -> Any:
    """Load a JSON file, returning ``default`` when it does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return default


def write_json(path: Path, value: object) -> None:
    """Write ``value`` as JSON atomically."""
    write_atomic(path, json.dumps(value, sort_keys=True).encode())


def utc_seconds(parts: time.struct_time) -> float:
    """Inverse of ``time.gmtime`` (seconds since the epoch of a UTC calendar time)."""
    return utc_from_fields(
        parts.tm_year, parts.tm_mon, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec
    )


def utc_from_fields(year: int, month: int, mday: int, hour: int, minute: int, sec: int) -> float:
    """Seconds since the epoch of a UTC calendar date and time."""
    shifted = year - (month <= 2)
    era = shifted // 400
    year_of_era = shifted - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + mday - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    return float(days * 86400 + hour * 3600 + minute * 60 + sec)


def utc(fmt: str, timestamp: float) -> str:
    """Format a UNIX timestamp as UTC with a ``strftime`` format."""
    return time.strftime(fmt, time.gmtime(timestamp))


def fake_now(root: Path) -> float:
    """Return "now" for the fake: ``ROOT/fake-clock`` (timestamp or ``+/-offset``) or the clock."""
    try:
        text = (root / "fake-clock").read_text().strip()
    except FileNotFoundError:
        return time.time()
    if not text:
        return time.time()
    if text[0] in "+-":
        return time.time() + float(text)
    return float(text)


def hash_hex(algorithm: str, data: bytes) -> str:
    """Digest ``data`` with one of the CVMFS hash algorithms (40 hex digits)."""
    if algorithm == "sha1":
        return hashlib.sha1(data, usedforsecurity=False).hexdigest()
    if algorithm == "rmd160":
        return hashlib.new("ripemd160", data, usedforsecurity=False).hexdigest()
    if algorithm == "shake128":
        return hashlib.shake_128(data).hexdigest(20)
    raise ValueError(f"unknown hash algorithm {algorithm}")


def algorithm_suffix(algorithm: str) -> str:
    """Return the object-name suffix of a hash algorithm (empty for SHA-1)."""
    return "" if algorithm == "sha1" else f"-{algorithm}"


def split_hash(value: str) -> tuple[str, str]:
    """Split ``<hex>[-algo]`` into (hex, algorithm); raise ValueError when malformed."""
    match = HASH_RE.match(value)
    if match is None:
        raise ValueError(f"malformed hash {value!r}")
    suffix = match.group(2) or ""
    return match.group(1), suffix[1:] if suffix else "sha1"


def is_null_hash(value: str) -> bool:
    """Whether ``value`` is the null hash (40 zeros, any algorithm suffix)."""
    return value[:40] == NULL_HEX


def object_path(data_dir: Path, name: str) -> Path:
    """Path of object ``name`` (hash + suffixes) below a storage's ``data`` directory."""
    return data_dir / name[:2] / name[2:]


def verify_object_bytes(name: str, payload: bytes) -> bool:
    """Whether ``payload`` hashes to the hash in object ``name`` (as ``check -i`` does)."""
    match = OBJECT_NAME_RE.match(name)
    if match is None:
        return False
    algorithm = (match.group(2) or "-sha1")[1:]
    try:
        return hash_hex(algorithm, payload) == match.group(1)
    except ValueError:
        return False


def inflate_complete(payload: bytes) -> bytes:
    """Decompress one complete zlib stream; raise ValueError when it is not exactly that."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload)
        data += inflater.flush()
    except zlib.error as exc:
        raise ValueError(str(exc)) from exc
    if not inflater.eof or inflater.unused_data:
        raise ValueError("incomplete or trailing zlib data")
    return data


def signature(key_file: Path, digest_hex: str) -> bytes:
    """256 bytes standing in for an RSA signature of ``digest_hex`` made with ``key_file``."""
    try:
        key = key_file.read_bytes()
    except OSError:
        key = b"missing key"
    out = b""
    counter = 0
    while len(out) < 256:
        out += hashlib.sha256(key + digest_hex.encode() + bytes([counter])).digest()
        counter += 1
    return out[:256]


def signed_file(text: str, key_file: Path) -> bytes:
    """Build the on-disk form of ``.cvmfspublished``/``.cvmfswhitelist``."""
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    return text.encode() + b"--\n" + digest.encode() + b"\n" + signature(key_file, digest)


def text_part(data: bytes) -> str:
    """Return the text part (before the ``--`` line) of a signed file."""
    head, sep, _ = data.partition(b"\n--\n")
    if not sep:
        raise ValueError("no signature separator")
    return head.decode() + "\n"


# --------------------------------------------------------------------------------------
# Manifest and whitelist
# --------------------------------------------------------------------------------------


class Manifest:
    """The text fields of ``.cvmfspublished``."""

    def __init__(
        self,
        root_hash: str,
        catalog_size: int,
        revision: int,
        garbage_collectable: bool,
        name: str,
        certificate: str,
        history: str,
        timestamp: int,
        meta_info: str,
        reflog: str,
        ttl: int = CATALOG_TTL,
    ) -> None:
        self.root_hash = root_hash
        self.catalog_size = catalog_size
        self.revision = revision
        self.garbage_collectable = garbage_collectable
        self.name = name
        self.certificate = certificate
        self.history = history
        self.timestamp = timestamp
        self.meta_info = meta_info
        self.reflog = reflog
        self.ttl = ttl

    def text(self) -> str:
        """Render the manifest's text part (fields in the recorded order)."""
        return (
            f"C{self.root_hash}\nB{self.catalog_size}\nR{EMPTY_PATH_MD5}\nD{self.ttl}\n"
            f"S{self.revision}\nG{'yes' if self.garbage_collectable else 'no'}\nAno\n"
            f"N{self.name}\nX{self.certificate}\nH{self.history}\nT{self.timestamp}\n"
            f"M{self.meta_info}\nY{self.reflog}\n"
        )

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse the text part of a manifest file."""
        fields: dict[str, str] = {}
        for line in text_part(data).splitlines():
            if line:
                fields[line[0]] = line[1:]
        return cls(
            root_hash=fields["C"],
            catalog_size=int(fields["B"]),
            revision=int(fields["S"]),
            garbage_collectable=fields.get("G") == "yes",
            name=fields["N"],
            certificate=fields["X"],
            history=fields["H"],
            timestamp=int(fields["T"]),
            meta_info=fields["M"],
            reflog=fields["Y"],
            ttl=int(fields.get("D", CATALOG_TTL)),
        )


class Whitelist:
    """The text fields of ``.cvmfswhitelist``."""

    def __init__(self, created: str, expires: str, name: str, fingerprints: list[str]) -> None:
        self.created = created
        self.expires = expires
        self.name = name
        self.fingerprints = fingerprints

    def text(self) -> str:
        """Render the whitelist's text part."""
        lines = [self.created, f"E{self.expires}", f"N{self.name}", *self.fingerprints]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, data: bytes) -> Whitelist:
        """Parse the text part of a whitelist file."""
        lines = text_part(data).splitlines()
        expires = ""
        name = ""
        prints: list[str] = []
        seen: set[str] = set()
        for line in lines[1:]:
            letter = line[:1]
            if letter in ("E", "N") and letter not in seen and not prints:
                seen.add(letter)
                if letter == "E":
                    expires = line[1:]
                else:
                    name = line[1:]
            elif line:
                prints.append(line)
        return cls(
            created=lines[0] if lines else "", expires=expires, name=name, fingerprints=prints
        )

    def expiry(self) -> float | None:
        """Expiry as a UNIX timestamp, or None when the E line cannot be parsed."""
        text = self.expires
        if len(text) != 14 or not text.isdigit():
            return None
        fields = [int(text[0:4]), *(int(text[i : i + 2]) for i in range(4, 14, 2))]
        if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] < 24):
            return None
        return utc_from_fields(*fields)


# --------------------------------------------------------------------------------------
# Catalogs
# --------------------------------------------------------------------------------------

CATALOG_FORMAT = "fake-cvmfs-catalog/1"


class CatalogEntry:
    """One path of a published revision, as the fake's catalog records it.

    ``kind`` is "dir", "file" or "symlink"; files carry the content reference: ``hash``
    (the whole-file object, None for chunked files without a bulk hash), ``compression``
    and ``chunks`` as (hash, offset, size) triples (objects stored with the ``P`` suffix).
    """

    __slots__ = (
        "chunks",
        "compression",
        "gid",
        "graft",
        "hash",
        "kind",
        "mode",
        "mtime",
        "size",
        "target",
        "uid",
    )

    def __init__(
        self,
        kind: str,
        mode: int,
        size: int,
        mtime: int,
        uid: int = 0,
        gid: int = 0,
        *,
        target: str | None = None,
        hash: str | None = None,
        compression: str = "zlib",
        chunks: list[tuple[str, int, int]] | None = None,
        graft: bool = False,
    ) -> None:
        self.kind = kind
        self.mode = mode
        self.size = size
        self.mtime = mtime
        self.uid = uid
        self.gid = gid
        self.target = target
        self.hash = hash
        self.compression = compression
        self.chunks = chunks if chunks is not None else []
        self.graft = graft

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CatalogEntry):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def __repr__(self) -> str:
        return f"CatalogEntry({self.to_json()!r})"

    def to_json(self) -> dict[str, object]:
        """Encode for the catalog JSON."""
        out: dict[str, object] = {
            "type": self.kind,
            "mode": self.mode,
            "size": self.size,
            "mtime": self.mtime,
            "uid": self.uid,
            "gid": self.gid,
        }
        if self.kind == "symlink":
            out["target"] = self.target
        if self.kind == "file":
            out["hash"] = self.hash
            out["compression"] = self.compression
            out["chunks"] = [list(chunk) for chunk in self.chunks]
            if self.graft:
                out["graft"] = True
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CatalogEntry:
        """Decode a catalog JSON entry."""
        return cls(
            kind=str(raw["type"]),
            mode=int(raw["mode"]),
            size=int(raw["size"]),
            mtime=int(raw["mtime"]),
            uid=int(raw.get("uid", 0)),
            gid=int(raw.get("gid", 0)),
            target=raw.get("target"),
            hash=raw.get("hash"),
            compression=str(raw.get("compression", "zlib")),
            chunks=[(str(c[0]), int(c[1]), int(c[2])) for c in raw.get("chunks", [])],
            graft=bool(raw.get("graft", False)),
        )

    def objects(self) -> list[str]:
        """Storage object names this entry references (bulk object and chunk objects)."""
        names: list[str] = []
        if self.kind != "file":
            return names
        if self.hash is not None:
            names.append(self.hash)
        names.extend(chunk[0] + "P" for chunk in self.chunks)
        return names


class Catalog:
    """A whole revision: every path (``/`` is the root) with its entry."""

    def __init__(
        self, repository: str, revision: int, timestamp: int, entries: dict[str, CatalogEntry]
    ) -> None:
        self.repository = repository
        self.revision = revision
        self.timestamp = timestamp
        self.entries = entries

    def encode(self) -> bytes:
        """Serialise (uncompressed)."""
        body = {
            "format": CATALOG_FORMAT,
            "repository": self.repository,
            "revision": self.revision,
            "timestamp": self.timestamp,
            "entries": {path: self.entries[path].to_json() for path in sorted(self.entries)},
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Catalog:
        """Parse a serialised catalog."""
        body = json.loads(data)
        if body.get("format") != CATALOG_FORMAT:
            raise ValueError("not a fake catalog")
        entries = {str(k): CatalogEntry.from_json(v) for k, v in body["entries"].items()}
        return cls(str(body["repository"]), int(body["revision"]), int(body["timestamp"]), entries)


# --------------------------------------------------------------------------------------
# Repository layout
# --------------------------------------------------------------------------------------


def parse_conf(text: str) -> dict[str, str]:
    """Parse a ``KEY=value`` shell-style configuration file."""
    conf: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        conf[key.strip()] = value
    return conf


class Repo:
    """Paths and configuration of one repository below a fake ROOT."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self._conf: dict[str, str] | None = None
        self._data_dir: str | None = None
        self._staging_dir: str | None = None

    # -- locations ------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        """``ROOT/etc/cvmfs``."""
        return self.root / "etc" / "cvmfs"

    @property
    def repo_conf_dir(self) -> Path:
        """``ROOT/etc/cvmfs/repositories.d/<repo>``."""
        return self.config_dir / "repositories.d" / self.name

    @property
    def server_conf(self) -> Path:
        """The repository's ``server.conf``."""
        return self.repo_conf_dir / "server.conf"

    def key(self, ext: str) -> Path:
        """A key file: ``ext`` is one of key, crt, pub, masterkey."""
        return self.config_dir / "keys" / f"{self.name}.{ext}"

    @property
    def union(self) -> Path:
        """The union directory (``CVMFS_UNION_DIR``)."""
        return Path(self.conf.get("CVMFS_UNION_DIR", str(self.root / "cvmfs" / self.name)))

    @property
    def spool(self) -> Path:
        """The spool directory (``CVMFS_SPOOL_DIR``)."""
        default = self.root / "var" / "spool" / "cvmfs" / self.name
        return Path(self.conf.get("CVMFS_SPOOL_DIR", str(default)))

    @property
    def state_dir(self) -> Path:
        """The fake's own bookkeeping for this repository (not part of CVMFS)."""
        return self.root / "fake" / "repos" / self.name

    @property
    def is_s3(self) -> bool:
        """Whether the upstream storage is of type S3."""
        return self.conf.get("CVMFS_UPSTREAM_STORAGE", "").startswith("S3,")

    @property
    def storage(self) -> Path:
        """The storage directory (for S3: a local directory standing in for the bucket)."""
        upstream = self.conf.get("CVMFS_UPSTREAM_STORAGE", "")
        parts = upstream.split(",")
        if upstream.startswith("S3,") and len(parts) >= 3:
            s3conf = parts[2].partition("@")[2]
            bucket = "bucket"
            with contextlib.suppress(OSError):
                bucket = parse_conf(Path(s3conf).read_text()).get("CVMFS_S3_BUCKET", bucket)
            return self.root / "s3" / bucket / self.name
        if len(parts) >= 3:
            return Path(parts[2])
        # without a configuration (e.g. after rmfs) an S3 stand-in bucket outlives it
        for leftover in sorted((self.root / "s3").glob(f"*/{self.name}")):
            return leftover
        return self.root / "srv" / "cvmfs" / self.name

    @property
    def data(self) -> Path:
        """The storage's ``data`` directory."""
        return self.storage / "data"

    @property
    def stratum0(self) -> str:
        """``CVMFS_STRATUM0``."""
        return self.conf.get("CVMFS_STRATUM0", "")

    # -- configuration --------------------------------------------------------------
    def reload_conf(self) -> None:
        """Forget the parsed server.conf and the locations derived from it."""
        self._conf = None
        self._data_dir = None
        self._staging_dir = None

    def exists(self) -> bool:
        """Whether the repository has been created (its server.conf exists)."""
        return bool(REPO_NAME_RE.match(self.name)) and self.server_conf.is_file()

    @property
    def conf(self) -> dict[str, str]:
        """The parsed server.conf (empty when missing)."""
        if self._conf is None:
            try:
                self._conf = parse_conf(self.server_conf.read_text())
            except (FileNotFoundError, NotADirectoryError):
                self._conf = {}
        return self._conf

    def flag(self, key: str, default: bool = False) -> bool:
        """A boolean server.conf setting."""
        value = self.conf.get(key)
        if value is None:
            return default
        return value.lower() in ("true", "yes", "1")

    @property
    def hash_algorithm(self) -> str:
        """``CVMFS_HASH_ALGORITHM`` (sha1 by default)."""
        value = self.conf.get("CVMFS_HASH_ALGORITHM", "sha1")
        return value if value in ALGORITHMS else "sha1"

    @property
    def compression(self) -> str:
        """Effective compression of published files: zlib (default) or none."""
        value = self.conf.get("CVMFS_COMPRESSION_ALGORITHM", "default")
        return "none" if value == "none" else "zlib"

    # -- storage objects ------------------------------------------------------------
    def object_file(self, name: str) -> Path:
        """Path of a storage object."""
        return object_path(self.data, name)

    def data_dir(self) -> str:
        """The storage's ``data`` directory as a string (cached: object paths are hot)."""
        if self._data_dir is None:
            self._data_dir = str(self.data)
        return self._data_dir

    def store_object(self, payload: bytes, suffix: str = "") -> str:
        """Store ``payload`` content-addressed (via ``data/txn``) and return its name.

        This is the hot path of a publish with thousands of files, so it works on plain
        strings and ``os`` calls instead of ``pathlib``.
        """
        algorithm = self.hash_algorithm
        name = hash_hex(algorithm, payload) + algorithm_suffix(algorithm) + suffix
        if self._staging_dir is None:
            staging = self.spool / "tmp" if self.is_s3 else self.data / "txn"
            staging.mkdir(parents=True, exist_ok=True)
            self._staging_dir = str(staging)
        target = f"{self.data_dir()}/{name[:2]}/{name[2:]}"
        try:
            if os.stat(target).st_mode & stat.S_IROTH:
                return name
        except FileNotFoundError:
            pass
        # written anew (the real local uploader replaces what it uploads): an object left
        # unreadable by a publish under a restrictive umask gets this process's mode
        tmp = f"{self._staging_dir}/{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        return name

    def read_object(self, name: str) -> bytes:
        """Read a storage object's bytes as stored."""
        with open(f"{self.data_dir()}/{name[:2]}/{name[2:]}", "rb") as handle:
            return handle.read()

    def load_json_object(self, name: str) -> Any:
        """Read a zlib-compressed JSON object (catalog, history, meta-info)."""
        return json.loads(zlib.decompress(self.read_object(name)))

    # -- signed files -----------------------------------------------------------------
    def manifest(self) -> Manifest:
        """The published manifest."""
        return Manifest.parse((self.storage / ".cvmfspublished").read_bytes())

    def write_manifest(self, manifest: Manifest) -> None:
        """Sign and write ``.cvmfspublished``."""
        write_atomic(
            self.storage / ".cvmfspublished", signed_file(manifest.text(), self.key("key"))
        )

    def whitelist(self) -> Whitelist:
        """The current whitelist."""
        return Whitelist.parse((self.storage / ".cvmfswhitelist").read_bytes())

    def catalog(self, root_hash: str) -> Catalog:
        """Load the catalog of a root hash (raise FileNotFoundError when swept/missing)."""
        return Catalog.decode(zlib.decompress(self.read_object(root_hash + "C")))

    # -- fake bookkeeping ---------------------------------------------------------------
    def mount_state(self) -> dict[str, Any]:
        """Mount state: union_mounted, union_rw, rdonly_mounted."""
        state = read_json(self.state_dir / "mount.json", None)
        if not isinstance(state, dict):
            return {"union_mounted": True, "union_rw": False, "rdonly_mounted": True}
        return state

    def set_mount_state(self, **changes: bool) -> None:
        """Update the recorded mount state and the spool's ``cvmfs_io`` socket stand-in."""
        state = self.mount_state()
        state.update(changes)
        write_json(self.state_dir / "mount.json", state)
        io_file = self.spool / "cvmfs_io"
        if state["rdonly_mounted"] or state["union_mounted"]:
            if not io_file.exists():
                io_file.write_bytes(b"")
        else:
            io_file.unlink(missing_ok=True)

    def revisions(self) -> list[dict[str, Any]]:
        """Every revision ever published: revision, root_hash, timestamp, catalog_size."""
        value = read_json(self.state_dir / "revisions.json", [])
        return value if isinstance(value, list) else []

    def add_revision(self, catalog: Catalog, root_hash: str, size: int) -> None:
        """Record a new revision in the fake's revision index."""
        revs = [r for r in self.revisions() if r["revision"] != catalog.revision]
        revs.append(
            {
                "revision": catalog.revision,
                "root_hash": root_hash,
                "timestamp": catalog.timestamp,
                "catalog_size": size,
            }
        )
        revs.sort(key=lambda r: int(r["revision"]))
        write_json(self.state_dir / "revisions.json", revs)

    def in_transaction(self) -> bool:
        """Whether ``in_transaction.lock`` exists."""
        return (self.spool / "in_transaction.lock").exists()

    def tags(self) -> list[dict[str, Any]]:
        """The tag database referenced by the manifest (insertion order)."""
        raw = self.load_json_object(self.manifest().history)
        tags = raw.get("tags", []) if isinstance(raw, dict) else []
        return [t for t in tags if isinstance(t, dict)]

    def reflog(self) -> dict[str, Any]:
        """The parsed ``.cvmfsreflog``."""
        value = read_json(self.storage / ".cvmfsreflog", {"fqrn": self.name, "refs": []})
        return value if isinstance(value, dict) else {"fqrn": self.name, "refs": []}


def list_repositories(root: Path) -> list[str]:
    """Names of the repositories configured below ROOT, sorted."""
    base = root / "etc" / "cvmfs" / "repositories.d"
    try:
        return sorted(p.name for p in base.iterdir() if (p / "server.conf").is_file())
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------
# Client view
# --------------------------------------------------------------------------------------


def _client_object(repo: Repo, name: str, compression: str, size: int | None) -> bytes:
    try:
        payload = repo.read_object(name)
    except OSError as exc:
        raise OSError(errno.EIO, f"object {name} cannot be fetched") from exc
    if not verify_object_bytes(name, payload):
        raise OSError(errno.EIO, f"object {name} does not match its hash")
    if compression == "zlib":
        try:
            data = inflate_complete(payload)
        except ValueError as exc:
            raise OSError(errno.EIO, f"object {name} is not a complete zlib stream") from exc
    else:
        data = payload
    if size is not None and len(data) != size:
        raise OSError(errno.EIO, f"object {name} has {len(data)} bytes instead of {size}")
    return data


def iter_file_content(repo: Repo, entry: CatalogEntry) -> Iterator[bytes]:
    """Yield a file's content as a client reads it; raise ``OSError(EIO)`` like the client.

    Every object is looked up under its name (chunks with ``P``), its bytes are verified
    against the hash in the name, and it is inflated as one complete zlib stream when the
    catalog says ``zlib``.
    """
    if entry.kind != "file":
        raise OSError(errno.EISDIR if entry.kind == "dir" else errno.EINVAL, "not a file")
    if entry.chunks:
        for chunk_hash, _offset, chunk_size in entry.chunks:
            yield _client_object(repo, chunk_hash + "P", entry.compression, chunk_size)
        return
    if entry.hash is None or is_null_hash(entry.hash):
        if entry.size == 0 and not entry.graft:
            return
        raise OSError(errno.EIO, "file has no content hash")
    yield _client_object(repo, entry.hash, entry.compression, entry.size)


def read_file_content(repo: Repo, entry: CatalogEntry) -> bytes:
    """Read a whole file through the client view."""
    return b"".join(iter_file_content(repo, entry))


# --------------------------------------------------------------------------------------
# Union directory scanning
# --------------------------------------------------------------------------------------

# kind, mode, size, mtime_ns, ino, ctime_ns, symlink target
StatInfo = tuple[str, int, int, int, int, int, str]


def _stat_info(st: os.stat_result, target: str) -> StatInfo:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return (kind, mode & 0o7777, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, target)


def scan_tree(top: Path) -> dict[str, StatInfo]:
    """Map every path below ``top`` (``/`` for ``top`` itself) to its stat information."""
    result: dict[str, StatInfo] = {}
    try:
        result["/"] = _stat_info(top.lstat(), "")
    except FileNotFoundError:
        return result
    pending: list[tuple[str, str]] = [(str(top), "")]
    is_reg = stat.S_ISREG
    while pending:
        directory, rel = pending.pop()
        try:
            iterator = os.scandir(directory)
        except OSError:
            continue
        with iterator:
            for item in iterator:
                path = f"{rel}/{item.name}"
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                mode = st.st_mode
                if is_reg(mode):
                    # the common case, without a call per entry
                    result[path] = (
                        "file",
                        mode & 0o7777,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ino,
                        st.st_ctime_ns,
                        "",
                    )
                    continue
                target = ""
                if stat.S_ISLNK(mode):
                    with contextlib.suppress(OSError):
                        target = str(Path(item.path).readlink())
                info = _stat_info(st, target)
                result[path] = info
                if info[0] == "dir":
                    pending.append((item.path, path))
    return result


def snapshot_key(info: StatInfo) -> tuple[object, ...]:
    """The part of the stat information whose change counts as a modification."""
    kind = info[0]
    if kind == "dir":
        return (kind, info[1])
    if kind == "symlink":
        return (kind, info[6])
    return info[:6]


def load_snapshot(repo: Repo) -> dict[str, StatInfo]:
    """The union directory's stat snapshot taken after the last publish/abort/restore."""
    raw = read_json(repo.state_dir / "snapshot.json", {})
    if not isinstance(raw, dict):
        return {}
    return {
        str(k): (str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), str(v[6]))
        for k, v in raw.items()
    }


def save_snapshot(repo: Repo, snap: dict[str, StatInfo]) -> None:
    """Persist a union snapshot."""
    write_atomic(repo.state_dir / "snapshot.json", json.dumps(snap, separators=(",", ":")).encode())


def diff_tree(snap: dict[str, StatInfo], current: dict[str, StatInfo]) -> list[str]:
    """Describe the differences between a snapshot and the current union tree."""
    changes: list[str] = []
    for path in sorted(set(snap) | set(current)):
        before = snap.get(path)
        after = current.get(path)
        if before is None:
            changes.append(f"added {path}")
        elif after is None:
            changes.append(f"removed {path}")
        elif snapshot_key(before) != snapshot_key(after):
            changes.append(f"modified {path}")
    return changes


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _materialise(repo: Repo, dest: Path, entry: CatalogEntry) -> None:
    if entry.kind == "dir":
        dest.mkdir(exist_ok=True)
        dest.chmod(entry.mode)
        return
    if entry.kind == "symlink":
        dest.symlink_to(entry.target or "")
        return
    tmp = dest.with_name(f".{dest.name}.fake-restore")
    with tmp.open("wb") as handle:
        try:
            for piece in iter_file_content(repo, entry):
                handle.write(piece)
        except OSError:
            handle.seek(0)
            handle.truncate()
    tmp.chmod(entry.mode)
    tmp.replace(dest)
    os.utime(dest, (entry.mtime, entry.mtime))


def sync_union(repo: Repo, catalog: Catalog, snap: dict[str, StatInfo]) -> list[str]:
    """Make the union directory show ``catalog`` again; return the paths it had to fix.

    Entries whose stat information still matches ``snap`` are kept; everything else is
    removed or rewritten from the storage through the client view (unreadable files are
    left empty).
    """
    union = repo.union
    union.mkdir(parents=True, exist_ok=True)
    current = scan_tree(union)
    fixed: list[str] = []
    for path in sorted(current, reverse=True):
        if path == "/":
            continue
        info = current[path]
        entry = catalog.entries.get(path)
        keep = entry is not None and entry.kind == info[0]
        if keep and info[0] != "dir":
            before = snap.get(path)
            keep = before is not None and snapshot_key(before) == snapshot_key(info)
        if not keep:
            _remove_path(union / path[1:])
            fixed.append(path)
            del current[path]
    for path in sorted(catalog.entries):
        entry = catalog.entries[path]
        dest = union if path == "/" else union / path[1:]
        present = current.get(path)
        if present is None:
            _materialise(repo, dest, entry)
            fixed.append(path)
        elif entry.kind == "dir" and present[1] != entry.mode:
            dest.chmod(entry.mode)
    for path in sorted((p for p, e in catalog.entries.items() if e.kind == "dir"), reverse=True):
        dest = union if path == "/" else union / path[1:]
        entry = catalog.entries[path]
        with contextlib.suppress(OSError):
            os.utime(dest, (entry.mtime, entry.mtime))
    return sorted(set(fixed))


# --------------------------------------------------------------------------------------
# Grafts
# --------------------------------------------------------------------------------------


class GraftError(Exception):
    """An invalid ``.cvmfsgraft-*`` file; ``detail`` is the ``(fs traversal)`` line, if any."""

    def __init__(self, detail: str | None) -> None:
        super().__init__(detail or "invalid graft")
        self.detail = detail


def parse_graft(
    text: str, default_compression: str, marker_for_messages: str
) -> tuple[int, str | None, str, list[tuple[str, int, int]]]:
    """Parse a graft file: (size, bulk hash or None, compression, chunks)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    raw_size = values.get("size")
    if raw_size is None:
        raise GraftError(None)
    if not raw_size.isdigit():
        raise GraftError(
            f"(fs traversal) Failed to parse value of size={raw_size} to "
            "integer: Invalid argument (errno=22)"
        )
    size = int(raw_size)
    checksum = values.get("checksum")
    if checksum is None or not HASH_RE.match(checksum):
        raise GraftError(None)
    compression = values.get("compression", default_compression)
    if compression not in ("zlib", "none"):
        raise GraftError(None)
    chunks: list[tuple[str, int, int]] = []
    if "chunk_offsets" in values or "chunk_checksums" in values:
        chunks = _parse_graft_chunks(values, size, marker_for_messages)
    bulk = None if is_null_hash(checksum) else checksum
    return size, bulk, compression, chunks


def _parse_graft_chunks(
    values: dict[str, str], size: int, marker: str
) -> list[tuple[str, int, int]]:
    try:
        offsets = [int(v) for v in values.get("chunk_offsets", "").split(",")]
    except ValueError as exc:
        raise GraftError(None) from exc
    sums = values.get("chunk_checksums", "").split(",")
    if len(offsets) != len(sums) or any(not HASH_RE.match(s) for s in sums):
        raise GraftError(None)
    if any(b <= a for a, b in itertools.pairwise(offsets)):
        raise GraftError(
            "(fs traversal) Chunk offsets must be sorted in strictly increasing "
            f"order (in graft marker {marker})."
        )
    if offsets[0] != 0 or offsets[-1] >= max(size, 1):
        raise GraftError(None)
    ends = [*offsets[1:], size]
    return [(s, o, e - o) for s, o, e in zip(sums, offsets, ends, strict=True)]


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def take_fault(root: Path, command: str, at: str, repo: str | None) -> dict[str, Any] | None:
    """Find (and consume one use of) the first fault rule matching this point."""
    faults_file = root / "fake-faults.json"
    if not faults_file.exists():
        return None
    with flocked(root / "fake" / "faults.lock"):
        rules = read_json(faults_file, [])
        if not isinstance(rules, list):
            return None
        for index, rule in enumerate(rules):
            if not isinstance(rule, dict):
                continue
            if rule.get("command") not in (command, "*"):
                continue
            if rule.get("at", "start") != at:
                continue
            if rule.get("repo") not in (None, repo):
                continue
            times = rule.get("times")
            if isinstance(times, int):
                if times <= 1:
                    rules.pop(index)
                else:
                    rule["times"] = times - 1
                write_json(faults_file, rules)
            return dict(rule)
    return None


# --------------------------------------------------------------------------------------
# Calibrated command costs
# --------------------------------------------------------------------------------------

# Keys of ``ROOT/fake-costs.json`` per command (seconds); see docs/fake-cvmfs.md.
COST_KEYS: dict[str, tuple[str, ...]] = {
    "transaction": ("base",),
    "publish": ("base", "per_file", "per_graft", "unlocked_per_file", "auto_gc"),
}


def command_costs(root: Path, command: str) -> dict[str, float]:
    """The cost rule of ``command`` in ``ROOT/fake-costs.json`` (empty: no padding).

    Unknown keys and values that are not non-negative numbers are ignored.
    """
    try:
        raw = json.loads((root / "fake-costs.json").read_bytes())
    except (OSError, ValueError):
        return {}
    rule = raw.get(command) if isinstance(raw, dict) else None
    if not isinstance(rule, dict):
        return {}
    costs: dict[str, float] = {}
    for key in COST_KEYS.get(command, ()):
        value = rule.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            costs[key] = float(value)
    return costs


# --------------------------------------------------------------------------------------
# Execution context
# --------------------------------------------------------------------------------------


class Context:
    """Output streams, clock, locks and fault points of one fake invocation."""

    def __init__(self, root: Path, command: str) -> None:
        self.root = root
        self.command = command
        self.repo_name: str | None = None
        self._locks: list[Any] = []
        self._storage: dict[str | None, str | None] = {}
        self.started = time.monotonic()
        self.parent = os.getppid()
        # publish stops at its first write to a closed stdout/stderr (faults.md F8)
        self.fail_on_broken_pipe = False

    # -- output -----------------------------------------------------------------------
    def out(self, text: str) -> None:
        """Write to stdout (flushed, so prompts and crashes keep the order)."""
        self._write(sys.stdout, text)

    def err(self, text: str) -> None:
        """Write to stderr."""
        self._write(sys.stderr, text)

    def _write(self, stream: Any, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            # whatever is written later (and the interpreter's last flush) goes nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)
            if self.fail_on_broken_pipe:
                raise CommandExit(1) from None

    def wait_orphaned(self) -> None:
        """Block until the process that started this command has died (re-parented)."""
        while os.getppid() == self.parent:
            time.sleep(0.02)

    def ask(self) -> str | None:
        """Read one answer line from stdin (None at EOF)."""
        line = sys.stdin.readline()
        return line.strip() if line else None

    def now(self) -> float:
        """The fake clock."""
        return fake_now(self.root)

    def pad_until(self, seconds: float) -> None:
        """Sleep until ``seconds`` have passed since this invocation started (calibrated costs)."""
        remaining = self.started + seconds - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    # -- locking ----------------------------------------------------------------------
    def lock_repo(self, repo: Repo, *, wait: bool = True) -> bool:
        """Take the repository's internal flock for the rest of the command.

        With ``wait=False`` give up at once (returning False) when another process holds it.
        """
        path = repo.state_dir / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._locks.append(handle)
        return True

    def release_locks(self) -> None:
        """Drop every internal flock this process holds."""
        for handle in self._locks:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
        self._locks.clear()

    # -- faults -----------------------------------------------------------------------
    def fault(self, at: str, fail: Callable[[dict[str, Any]], NoReturn] | None = None) -> None:
        """A fault-injection point: apply the first matching rule of ``fake-faults.json``."""
        rule = take_fault(self.root, self.command, at, self.repo_name)
        if rule is None:
            return
        action = rule.get("action")
        if action == "orphaned":
            self.wait_orphaned()
        delay = rule.get("delay")
        if isinstance(delay, (int, float)) and delay > 0:
            time.sleep(float(delay))
        if action in ("delay", "orphaned"):
            return
        if action == "hang":
            self.release_locks()
            while True:
                time.sleep(3600)
        if action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "exit":
            self.out(str(rule.get("stdout") or ""))
            self.err(str(rule.get("stderr") or ""))
            os._exit(int(rule.get("exit_code", 1)))
        if action == "fail":
            if fail is not None:
                fail(rule)
            self.fail_with(rule, "", f"fake fault: {self.command} failed at {at}\n", 1)

    def fail_with(self, rule: dict[str, Any], stdout: str, stderr: str, code: int) -> NoReturn:
        """Print a failure (the rule's texts override the defaults) and exit."""
        self.out(str(rule["stdout"]) if rule.get("stdout") is not None else stdout)
        self.err(str(rule["stderr"]) if rule.get("stderr") is not None else stderr)
        raise CommandExit(int(rule["exit_code"]) if rule.get("exit_code") is not None else code)

    def storage_fault(self) -> str | None:
        """The storage condition for the current repository: None, "unreachable" or hang.

        Looked up once per repository and invocation, so ``times`` counts commands.
        """
        if self.repo_name not in self._storage:
            rule = take_fault(self.root, "storage", "access", self.repo_name)
            self._storage[self.repo_name] = None if rule is None else str(rule.get("action"))
        action = self._storage[self.repo_name]
        if action == "hang":
            self.release_locks()
            while True:
                time.sleep(3600)
        return action


# --------------------------------------------------------------------------------------
# Checks shared by several subcommands
# --------------------------------------------------------------------------------------


def require_repo(ctx: Context, name: str, *, period: bool = True) -> Repo:
    """Load a repository or fail with the recorded unknown-repository message."""
    repo = Repo(ctx.root, name)
    ctx.repo_name = name
    if not repo.exists():
        ctx.err(f"The repository {name} does not exist{'.' if period else ''}\n")
        raise CommandExit(1)
    return repo


def whitelist_problem(ctx: Context, repo: Repo) -> str | None:
    """Why the whitelist cannot be loaded ("expired whitelist", ...), or None when valid."""
    if ctx.storage_fault() == "unreachable":
        return "failed to download whitelist"
    try:
        whitelist = repo.whitelist()
    except (OSError, ValueError):
        return "failed to download whitelist"
    expiry = whitelist.expiry()
    if expiry is None:
        return "malformed whitelist"
    if ctx.now() >= expiry:
        return "expired whitelist"
    return None


def check_union_violations(ctx: Context, repo: Repo) -> None:
    """Log and revert changes made to the union directory outside a transaction."""
    if repo.in_transaction() or not repo.mount_state()["union_mounted"]:
        return
    snap = load_snapshot(repo)
    if not snap:
        return
    current = scan_tree(repo.union)
    changes = diff_tree(snap, current)
    if not changes:
        return
    stamp = utc("%Y-%m-%dT%H:%M:%SZ", time.time())
    lines = [
        f"{stamp} {repo.name}: {change} in {repo.union} outside a transaction "
        f"(noticed by `{ctx.command}`)\n"
        for change in changes
    ]
    with (
        flocked(ctx.root / "fake" / "violations.lock"),
        (ctx.root / "fake-violations.log").open("a") as log,
    ):
        log.writelines(lines)
    try:
        catalog = repo.catalog(repo.manifest().root_hash)
    except (OSError, ValueError):
        return
    sync_union(repo, catalog, snap)
    save_snapshot(repo, scan_tree(repo.union))


def remount_published(repo: Repo) -> None:
    """Show the published revision in the union directory again (after a repair)."""
    try:
        catalog = repo.catalog(repo.manifest().root_hash)
    except (OSError, ValueError):
        return
    sync_union(repo, catalog, load_snapshot(repo))
    save_snapshot(repo, scan_tree(repo.union))


def repair_mounts(ctx: Context, repo: Repo, *, style: str) -> bool:
    """The shell's health check: report missing mounts and repair them when allowed.

    ``style`` selects the recorded wording: "transaction" (``transaction``, ``abort``),
    "publish" (trailing period, ``Note:`` prefix). Returns False when auto-repair is
    disabled and something is missing.
    """
    state = repo.mount_state()
    missing: list[tuple[str, Path]] = []
    if not state["rdonly_mounted"]:
        missing.append(("rdonly", repo.spool / "rdonly"))
    if not state["union_mounted"]:
        missing.append(("union", repo.union))
    if not missing:
        return True
    period = "." if style == "publish" else ""
    for _, path in missing:
        ctx.err(f"{path} is not mounted properly{period}\n")
    if not repo.flag("CVMFS_AUTO_REPAIR_MOUNTPOINT", default=True):
        return False
    note = "Note: " if style == "publish" else ""
    for kind, path in missing:
        ctx.err(f"{note}Trying to mount {path}... success\n")
        if kind == "rdonly":
            if style == "transaction":
                ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))
            repo.set_mount_state(rdonly_mounted=True)
        else:
            repo.set_mount_state(union_mounted=True, union_rw=repo.in_transaction())
            if not repo.in_transaction():
                remount_published(repo)
    return True


def open_fds_under(directory: Path) -> tuple[list[str], list[str]]:
    """Processes with open fds below ``directory``: (writable lsof lines, read-only lines)."""
    base = os.path.realpath(directory)
    prefix = base + "/"
    own = os.getpid()
    writable: list[str] = []
    readonly: list[str] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return writable, readonly
    for pid in pids:
        if int(pid) == own:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = str(Path(f"{fd_dir}/{fd}").readlink())
            except OSError:
                continue
            if target != base and not target.startswith(prefix):
                continue
            flags = 0
            with contextlib.suppress(OSError, ValueError):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                for line in info.splitlines():
                    if line.startswith("flags:"):
                        flags = int(line.split()[1], 8)
            line = _lsof_line(pid, target)
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                writable.append(line)
            else:
                readonly.append(line)
    return writable, readonly


def _lsof_line(pid: str, target: str) -> str:
    comm = "?"
    user = "?"
    with contextlib.suppress(OSError):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    with contextlib.suppress(OSError, KeyError, ImportError):
        import pwd

        user = pwd.getpwuid(Path(f"/proc/{pid}").stat().st_uid).pw_name
    return f"{comm:<10} {pid}  {user:<9} {target}"


def cwd_inside(directory: Path) -> bool:
    """Whether this process's working directory is inside ``directory``."""
    try:
        cwd = os.path.realpath(Path.cwd())
    except OSError:
        return False
    base = os.path.realpath(directory)
    return cwd == base or cwd.startswith(base + "/")


# --------------------------------------------------------------------------------------
# Repository creation
# --------------------------------------------------------------------------------------


def current_user() -> str:
    """Name of the user running the fake."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _server_conf_text(
    repo: Repo,
    *,
    user: str,
    stratum0: str,
    upstream: str,
    gc: bool,
    auto_tag: bool,
    timespan: str,
    algorithm: str,
    compression: str,
) -> str:
    lines = [
        "# Created by cvmfs_server.",
        f"CVMFS_CREATOR_VERSION={CREATOR_VERSION}",
        f"CVMFS_REPOSITORY_NAME={repo.name}",
        "CVMFS_REPOSITORY_TYPE=stratum0",
        f"CVMFS_USER={user}",
        f"CVMFS_UNION_DIR={repo.root / 'cvmfs' / repo.name}",
        f"CVMFS_SPOOL_DIR={repo.root / 'var' / 'spool' / 'cvmfs' / repo.name}",
        f"CVMFS_STRATUM0={stratum0}",
        f"CVMFS_UPSTREAM_STORAGE={upstream}",
        "CVMFS_USE_FILE_CHUNKING=true",
        "CVMFS_MIN_CHUNK_SIZE=4194304",
        "CVMFS_AVG_CHUNK_SIZE=8388608",
        "CVMFS_MAX_CHUNK_SIZE=16777216",
        "CVMFS_UNION_FS_TYPE=overlayfs",
        f"CVMFS_HASH_ALGORITHM={algorithm}",
        f"CVMFS_COMPRESSION_ALGORITHM={compression}",
        "CVMFS_EXTERNAL_DATA=false",
        f"CVMFS_AUTO_TAG={'true' if auto_tag else 'false'}",
        f'CVMFS_AUTO_TAG_TIMESPAN="{timespan}"',
        f"CVMFS_GARBAGE_COLLECTION={'true' if gc else 'false'}",
        "CVMFS_AUTO_REPAIR_MOUNTPOINT=true",
        "CVMFS_AUTOCATALOGS=false",
        "CVMFS_ASYNC_SCRATCH_CLEANUP=true",
        "CVMFS_PRINT_STATISTICS=false",
        "CVMFS_UPLOAD_STATS_DB=false",
        "CVMFS_UPLOAD_STATS_PLOTS=false",
        "CVMFS_IGNORE_XDIR_HARDLINKS=true",
    ]
    if gc:
        lines.append("CVMFS_AUTO_GC=true")
    return "\n".join(lines) + "\n"


def _client_conf_text(repo: Repo, stratum0: str) -> str:
    spool = repo.root / "var" / "spool" / "cvmfs" / repo.name
    return (
        "# Created by cvmfs_server.  Don't touch.\n"
        f"CVMFS_CACHE_BASE={spool}/cache\n"
        f"CVMFS_RELOAD_SOCKETS={spool}/cache\n"
        "CVMFS_QUOTA_LIMIT=4000\n"
        f"CVMFS_MOUNT_DIR={repo.root / 'cvmfs'}\n"
        f"CVMFS_SERVER_URL={stratum0}\n"
        "CVMFS_HTTP_PROXY=DIRECT\n"
        f"CVMFS_PUBLIC_KEY={repo.key('pub')}\n"
        "CVMFS_CHECK_PERMISSIONS=yes\n"
        "CVMFS_IGNORE_SIGNATURE=no\n"
        "CVMFS_AUTO_UPDATE=no\n"
        "CVMFS_NFS_SOURCE=no\n"
        "CVMFS_MAGIC_XATTRS_VISIBILITY=never\n"
        "CVMFS_FOLLOW_REDIRECTS=yes\n"
        "CVMFS_SERVER_CACHE_MODE=yes\n"
        "CVMFS_NFILES=65536\n"
        f"CVMFS_TALK_SOCKET={spool}/cvmfs_io\n"
        f"CVMFS_TALK_OWNER={current_user()}\n"
        "CVMFS_USE_SSL_SYSTEM_CA=true\n"
    )


def _write_keys(repo: Repo) -> None:
    keys = repo.config_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    seed = hashlib.sha256(f"{repo.name}:{os.urandom(16).hex()}".encode()).hexdigest()
    contents = {
        "masterkey": ("FAKE RSA PRIVATE KEY", "master", 0o400),
        "key": ("FAKE RSA PRIVATE KEY", "manifest", 0o400),
        "crt": ("FAKE CERTIFICATE", "certificate", 0o444),
        "pub": ("FAKE PUBLIC KEY", "master-public", 0o444),
    }
    for ext, (label, purpose, mode) in contents.items():
        path = repo.key(ext)
        body = f"-----BEGIN {label}-----\n{purpose}:{repo.name}:{seed}\n-----END {label}-----\n"
        if path.exists():
            path.chmod(0o600)
        path.write_text(body)
        path.chmod(mode)


def fingerprint(repo: Repo) -> str:
    """SHA-1 fingerprint of the repository certificate, as listed in the whitelist."""
    digest = hashlib.sha1(repo.key("crt").read_bytes(), usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 40, 2)).upper()


def write_whitelist(repo: Repo, now: float, days: str) -> None:
    """Sign a whitelist valid for ``days`` days (a non-number gives an empty E line)."""
    created = utc("%Y%m%d%H%M%S", now)
    expires = utc("%Y%m%d%H%M%S", now + int(days) * 86400) if days.isdigit() else ""
    whitelist = Whitelist(created, expires, repo.name, [fingerprint(repo)])
    write_atomic(
        repo.storage / ".cvmfswhitelist", signed_file(whitelist.text(), repo.key("masterkey"))
    )


def _init_spool(repo: Repo, root_hash: str) -> None:
    for sub in SPOOL_DIRS:
        (repo.spool / sub).mkdir(parents=True, exist_ok=True)
    (repo.spool / "ofs_workdir" / "work").chmod(0o000)
    (repo.spool / "ovl_work").chmod(0o700)
    (repo.spool / "stats.db").write_bytes(b"SQLite format 3\x00 fake statistics\n")
    (repo.spool / "client.local").write_text(f"CVMFS_ROOT_HASH={root_hash}\n")


def _init_storage(repo: Repo) -> None:
    data = repo.data
    data.mkdir(parents=True, exist_ok=True)
    for i in range(256):
        (data / f"{i:02x}").mkdir(exist_ok=True)
    if not repo.is_s3:
        (data / "txn").mkdir(exist_ok=True)
    (repo.storage / ".cvmfs_master_replica").write_text(MASTER_REPLICA_TEXT)


def record_refs(
    repo: Repo, refs: list[tuple[str, int]], when: float, drop: set[str] | None = None
) -> str:
    """Add object references to ``.cvmfsreflog`` (dropping ``drop``); return its hash."""
    reflog = repo.reflog()
    entries = [r for r in reflog.get("refs", []) if not drop or r[0] not in drop]
    known = {r[0] for r in entries}
    for name, kind in refs:
        if name not in known:
            entries.append([name, kind, int(when)])
            known.add(name)
    reflog["refs"] = entries
    reflog["fqrn"] = repo.name
    data = json.dumps(reflog, sort_keys=True).encode()
    write_atomic(repo.storage / ".cvmfsreflog", data)
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    (repo.spool / "reflog.chksum").write_text(digest)
    return digest


def store_history(repo: Repo, tags: list[dict[str, Any]]) -> str:
    """Store a tag database object (suffix H) and return its name."""
    payload = zlib.compress(json.dumps({"tags": tags}, sort_keys=True).encode())
    return repo.store_object(payload, "H")


def store_catalog(repo: Repo, catalog: Catalog) -> tuple[str, int]:
    """Store a catalog object (suffix C); return (root hash without suffix, size)."""
    raw = catalog.encode()
    name = repo.store_object(zlib.compress(raw), "C")
    return name[:-1], len(raw)


def cmd_mkfs(ctx: Context, args: list[str]) -> None:
    """``mkfs [-o USER] [-z] [-g] [-G SPAN] [-a ALGO] [-Z COMP] [-s S3CONF -w URL] REPO``."""
    opts, rest = parse_options(args, "o:zgG:a:Z:s:w:fpu:m:vk:X")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server mkfs [options] <fully qualified repository name>\n")
        raise CommandExit(1)
    repo = Repo(ctx.root, rest[0])
    ctx.repo_name = repo.name
    options = dict(opts)
    if not REPO_NAME_RE.match(repo.name):
        ctx.err(f"Invalid repository name: {repo.name}\n")
        raise CommandExit(1)
    ctx.fault("start")
    if repo.exists():
        ctx.err(f"Repository {repo.name} already exists\n")
        raise CommandExit(1)
    user = options.get("-o", current_user())
    gc = "-z" in options
    auto_tag = "-g" not in options
    algorithm = options.get("-a", "sha1")
    compression = options.get("-Z", "default")
    if algorithm not in ALGORITHMS or compression not in ("default", "zlib", "none"):
        ctx.err("unsupported hash or compression algorithm\n")
        raise CommandExit(1)
    s3conf = options.get("-s")
    if s3conf is not None:
        if "-w" not in options:
            ctx.err("S3 repositories need a stratum 0 URL (-w)\n")
            raise CommandExit(1)
        stratum0 = options["-w"].rstrip("/") + "/" + repo.name
        upstream = (
            f"S3,{repo.root / 'var' / 'spool' / 'cvmfs' / repo.name / 'tmp'},{repo.name}@{s3conf}"
        )
    else:
        storage = repo.root / "srv" / "cvmfs" / repo.name
        stratum0 = options.get("-w", f"file://{storage}")
        upstream = f"local,{storage / 'data' / 'txn'},{storage}"
    ctx.lock_repo(repo)
    if gc and auto_tag:
        ctx.out("Note: Autotagging all revisions impedes garbage collection\n")
    repo.repo_conf_dir.mkdir(parents=True, exist_ok=True)
    conf_text = _server_conf_text(
        repo,
        user=user,
        stratum0=stratum0,
        upstream=upstream,
        gc=gc,
        auto_tag=auto_tag,
        timespan=options.get("-G", ""),
        algorithm=algorithm,
        compression=compression,
    )
    (repo.repo_conf_dir / "client.conf").write_text(_client_conf_text(repo, stratum0))
    repo.server_conf.write_text(conf_text)
    repo.reload_conf()
    ctx.out("Creating Configuration Files... done\n")
    _write_keys(repo)
    ctx.out("Creating CernVM-FS Master Key and Self-Signed Certificate... done\n")
    repo.state_dir.mkdir(parents=True, exist_ok=True)
    repo.spool.mkdir(parents=True, exist_ok=True)
    ctx.out("Creating CernVM-FS Server Infrastructure... done\n")
    _init_storage(repo)
    if not repo.is_s3:
        ctx.out("Creating Backend Storage... done\n")
    now = ctx.now()
    write_whitelist(repo, now, "30")
    ctx.out("Signing 30 day whitelist with master key... done\n")
    _create_initial_revisions(repo, now)
    if auto_gc_enabled(repo):
        # The real mkfs publishes its initial commit with `cvmfs_server publish`; with no
        # last_gc yet that publish's automatic gc is due, runs silently (output to
        # /dev/null) and leaves .cvmfs_status.json behind (k 5: present right after mkfs).
        write_gc_status(repo, now)
    ctx.out("Creating Initial Repository... done\n")
    ctx.out("Mounting CernVM-FS Storage... (overlayfs) done\n")
    ctx.out("Allowing Replication of this Repository... done\n")
    ctx.out(f"Initial commit... New CernVM-FS repository for {repo.name}\n")
    ctx.out("Updating global JSON information... done\n")
    ctx.out(MKFS_TAIL.format(union=repo.union, user=user, keys=repo.config_dir / "keys"))


def _create_initial_revisions(repo: Repo, now: float) -> None:
    stamp = int(now)
    root = CatalogEntry("dir", 0o755, 4096, stamp, os.getuid(), os.getgid())
    empty = Catalog(repo.name, 0, stamp, {"/": root})
    hash0, size0 = store_catalog(repo, empty)
    repo.add_revision(empty, hash0, size0)
    content = f"New CernVM-FS repository for {repo.name}\n".encode()
    payload = zlib.compress(content) if repo.compression == "zlib" else content
    data_name = repo.store_object(payload)
    first = Catalog(
        repo.name,
        1,
        stamp,
        {
            "/": root,
            "/new_repository": CatalogEntry(
                "file",
                0o644,
                len(content),
                stamp,
                os.getuid(),
                os.getgid(),
                hash=data_name,
                compression=repo.compression,
            ),
        },
    )
    hash1, size1 = store_catalog(repo, first)
    repo.add_revision(first, hash1, size1)
    record = _revision_record(first, hash1, size1)
    certificate = repo.store_object(zlib.compress(repo.key("crt").read_bytes()), "X")
    meta = repo.store_object(zlib.compress(META_INFO_TEXT.encode()), "M")
    tags: list[dict[str, Any]] = []
    if repo.flag("CVMFS_AUTO_TAG", default=True):
        tags.append(_tag(utc("generic-%Y-%m-%dT%H:%M:%SZ", now), record, ""))
    tags.append(_tag("trunk", record, "current HEAD"))
    history = store_history(repo, tags)
    reflog = record_refs(
        repo, [(hash0 + "C", 0), (hash1 + "C", 0), (certificate, 1), (history, 2), (meta, 3)], now
    )
    repo.write_manifest(
        Manifest(
            hash1,
            size1,
            1,
            repo.flag("CVMFS_GARBAGE_COLLECTION"),
            repo.name,
            certificate,
            history,
            stamp,
            meta,
            reflog,
        )
    )
    _init_spool(repo, hash1)
    repo.union.mkdir(parents=True, exist_ok=True)
    repo.set_mount_state(union_mounted=True, union_rw=False, rdonly_mounted=True)
    sync_union(repo, first, {})
    save_snapshot(repo, scan_tree(repo.union))


def _tag(name: str, revision: dict[str, Any], description: str) -> dict[str, Any]:
    """A tag database row for a revision record (as kept in ``revisions.json``)."""
    return {
        "name": name,
        "hash": revision["root_hash"],
        "size": revision["catalog_size"],
        "revision": revision["revision"],
        "timestamp": revision["timestamp"],
        "branch": "",
        "description": description,
    }


def _revision_record(catalog: Catalog, root_hash: str, size: int) -> dict[str, Any]:
    return {
        "revision": catalog.revision,
        "root_hash": root_hash,
        "timestamp": catalog.timestamp,
        "catalog_size": size,
    }


# --------------------------------------------------------------------------------------
# transaction
# --------------------------------------------------------------------------------------


def split_repo_arg(arg: str) -> tuple[str, str]:
    """Split ``repo/sub/path`` into (repo, "/sub/path"); the path may be empty."""
    name, _, sub = arg.partition("/")
    sub = sub.strip("/")
    return name, f"/{sub}" if sub else ""


def cmd_transaction(ctx: Context, args: list[str]) -> None:
    """``transaction [-t SECONDS] REPO[/path]``."""
    opts, rest = parse_options(args, "t:T:i")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server transaction [-t timeout] <repository name>[/path]\n")
        raise CommandExit(1)
    name, scope = split_repo_arg(rest[0])
    repo = require_repo(ctx, name)
    timeout: float | None = None
    for key, value in opts:
        if key in ("-t", "-T"):
            try:
                timeout = float(value)
            except ValueError:
                ctx.err(f"invalid timeout: {value}\n")
                raise CommandExit(1) from None
    ctx.fault(
        "start",
        lambda rule: ctx.fail_with(
            rule, "", "cannot load whitelist [failed to download whitelist]\n", 5
        ),
    )
    if repo.in_transaction() and timeout is None:
        ctx.err("CernVM-FS transaction error: another transaction is already open\n")
        raise CommandExit(17)
    ctx.lock_repo(repo)
    check_union_violations(ctx, repo)
    repair_mounts(ctx, repo, style="transaction")
    problem = whitelist_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"cannot load whitelist [{problem}]\n")
        raise CommandExit(5)
    if timeout is None:
        raise CommandExit(_open_transaction(ctx, repo, scope))
    ctx.release_locks()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        raise CommandExit(os.waitstatus_to_exitcode(status))
    raise CommandExit(_retry_transaction(ctx, repo, scope, timeout))


def _retry_transaction(ctx: Context, repo: Repo, scope: str, timeout: float) -> int:
    """The waiting child of ``transaction -t``: retry with a growing back-off."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    backoff = 0.1
    while True:
        if not repo.in_transaction():
            ctx.lock_repo(repo)
            if not repo.in_transaction():
                return _open_transaction(ctx, repo, scope)
            ctx.release_locks()
        if deadline is not None and time.monotonic() >= deadline:
            ctx.err("CernVM-FS transaction error: another transaction is already open\n")
            return 17
        ctx.out("repository busy, retrying\n")
        time.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


def _open_transaction(ctx: Context, repo: Repo, scope: str) -> int:
    if repo.in_transaction():
        ctx.err("CernVM-FS transaction error: another transaction is already open\n")
        return 17
    if scope:
        parent = scope.rsplit("/", 1)[0] or "/"
        if not (repo.union / parent.lstrip("/")).is_dir():
            ctx.err(
                "CernVM-FS transaction error: cannot open transaction on non-existing "
                f"path {parent}\n"
            )
            return 2
    if not repo.mount_state()["union_mounted"]:
        ctx.err(
            "(unexpected termination) cannot establish writable mountpoint\n" + TRACE_TRANSACTION
        )
        return 1
    lock = repo.spool / "in_transaction.lock"
    lock.touch()
    lock.chmod(0o600)
    write_json(repo.state_dir / "transaction.json", {"scope": scope, "opened": ctx.now()})
    ctx.fault("after_lock")
    repo.set_mount_state(union_rw=True)
    ctx.pad_until(command_costs(ctx.root, "transaction").get("base", 0.0))
    return 0


# --------------------------------------------------------------------------------------
# publish
# --------------------------------------------------------------------------------------

PUBLISH_STEPS_BEFORE_UPLOAD = (
    "Swissknife Sync: Processing changes...\n",
    "Waiting for upload of files before committing...\n",
)


def swissknife_command(repo: Repo, root_hash: str, tag: str, message: str | None) -> str:
    """The ``Executed Command:`` line cvmfs_server prints after a failed sync."""
    conf = repo.conf
    parts = [
        "cvmfs_swissknife sync",
        f"-u {repo.union}",
        f"-s {repo.spool}/scratch/current",
        f"-c {repo.spool}/rdonly",
        f"-t {repo.spool}/tmp",
        f"-b {root_hash}",
        f"-r {conf.get('CVMFS_UPSTREAM_STORAGE', '')}",
        f"-w {repo.stratum0}",
        f"-o {repo.spool}/tmp/manifest",
        f"-e {repo.hash_algorithm}",
        f"-Z {conf.get('CVMFS_COMPRESSION_ALGORITHM', 'default')}",
        f"-N {repo.name}",
        f"-K {repo.key('pub')}",
        "-L",
    ]
    if tag:
        parts.append(f"-D {tag}")
    if message:
        parts.append(f"-J {message}")
    parts += [
        "-f overlayfs",
        "-p",
        f"-l {conf.get('CVMFS_MIN_CHUNK_SIZE', '4194304')}",
        f"-a {conf.get('CVMFS_AVG_CHUNK_SIZE', '8388608')}",
        f"-h {conf.get('CVMFS_MAX_CHUNK_SIZE', '16777216')}",
        "-i",
    ]
    return " ".join(parts)


class PublishJob:
    """Everything one ``publish`` run needs."""

    def __init__(
        self,
        repo: Repo,
        manifest: Manifest,
        tag_name: str,
        message: str | None,
        now: float,
        gc_threshold: float,
    ) -> None:
        self.repo = repo
        self.manifest = manifest
        self.tag_name = tag_name
        self.message = message
        self.now = now
        self.gc_threshold = gc_threshold
        self.uploaded: list[str] = []
        self.copied = 0
        self.grafts = 0
        self.auto_gc = False

    def cost(self, costs: dict[str, float], *, locked: bool) -> float:
        """Calibrated duration of this publish (``locked``: the part before the transaction
        lock is released)."""
        per_file = costs.get("per_file", 0.0)
        if locked:
            per_file = max(0.0, per_file - costs.get("unlocked_per_file", 0.0))
        return (
            costs.get("base", 0.0)
            + self.copied * per_file
            + self.grafts * costs.get("per_graft", 0.0)
            + (costs.get("auto_gc", 0.0) if self.auto_gc else 0.0)
        )


def cmd_publish(ctx: Context, args: list[str]) -> None:
    """``publish [-m MSG] [-a TAG] [-f] REPO[/path]``."""
    opts, rest = parse_options(args, "m:a:fpe:vF:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server publish [options] <repository name>\n")
        raise CommandExit(1)
    name, _ = split_repo_arg(rest[0])
    repo = require_repo(ctx, name)
    ctx.fail_on_broken_pipe = True
    options = dict(opts)
    force = "-f" in options
    ctx.fault(
        "start",
        lambda rule: ctx.fail_with(rule, f"Repository unavailable under {repo.stratum0}\n", "", 1),
    )
    ctx.lock_repo(repo)
    check_union_violations(ctx, repo)
    _publish_mount_checks(ctx, repo)
    if ctx.storage_fault() == "unreachable":
        ctx.out(f"Repository unavailable under {repo.stratum0}\n")
        raise CommandExit(1)
    if whitelist_problem(ctx, repo) == "expired whitelist":
        ctx.out(f"Repository whitelist for {repo.name} is expired!\n")
        raise CommandExit(1)
    if not repo.in_transaction():
        ctx.out(f"Repository {repo.name} is not in a transaction\n")
        raise CommandExit(1)
    if (repo.spool / "is_collecting.lock").exists():
        ctx.err(f"Repository {repo.name} is busy: garbage collection is running\n")
        raise CommandExit(1)
    if cwd_inside(repo.union):
        ctx.out(
            f"Current working directory is in {repo.union}.  Please release, e.g. by 'cd $HOME'.\n"
        )
        raise CommandExit(1)
    writable, readonly = open_fds_under(repo.union)
    if writable:
        ctx.out(f"Open writable file descriptors on {repo.name}\n")
        raise CommandExit(1)
    now = ctx.now()
    gc_threshold = auto_gc_threshold(ctx, repo, now)
    manifest = repo.manifest()
    tag_name = options.get("-a", "")
    if not tag_name and repo.flag("CVMFS_AUTO_TAG", default=True):
        tag_name = _auto_tag_name(repo, now)
        ctx.out(f"Using auto tag '{tag_name}'\n")
    if readonly:
        _confirm_readonly_fds(ctx, repo, readonly, force=force)
    job = PublishJob(repo, manifest, tag_name, options.get("-m"), now, gc_threshold)
    publishing = repo.spool / "is_publishing.lock"
    publishing.touch()
    # the union is read-only while publish works on it: a publish killed without its
    # cleanup trap (SIGKILL to its group) leaves it so, with the lock (faults.md F9)
    repo.set_mount_state(union_rw=False)
    try:
        _run_publish(ctx, job)
    except BaseException:
        # the cleanup trap (publish_failed): the transaction stays open, read/write
        if repo.in_transaction():
            repo.set_mount_state(union_rw=True)
        raise
    finally:
        publishing.unlink(missing_ok=True)
    # the real publish ends with a file system flush after both locks are released
    ctx.release_locks()
    ctx.pad_until(job.cost(command_costs(ctx.root, "publish"), locked=False))


def _publish_mount_checks(ctx: Context, repo: Repo) -> None:
    state = repo.mount_state()
    in_txn = repo.in_transaction()
    if in_txn and (not state["union_mounted"] or not state["union_rw"]):
        if not state["union_mounted"]:
            ctx.err(f"{repo.union} is not mounted properly.\n")
        ctx.err(
            f"{repo.name} is in a transaction but {repo.union} is not mounted read/write\n"
            f"Repository {repo.name} is in a transaction and cannot be repaired.\n"
            f"--> Run `cvmfs_server abort {repo.name}` to revert and repair.\n"
        )
        raise CommandExit(1)
    if not repair_mounts(ctx, repo, style="publish"):
        ctx.err("Auto-Repair is disabled (CVMFS_AUTO_REPAIR_MOUNTPOINT = false)\n")
        raise CommandExit(1)


def _auto_tag_name(repo: Repo, now: float) -> str:
    try:
        existing = {str(t.get("name")) for t in repo.tags()}
    except (OSError, ValueError):
        existing = set()
    stamp = utc("%Y-%m-%dT%H:%M:%SZ", now)
    name = f"generic-{stamp}"
    counter = 0
    while name in existing:
        counter += 1
        name = f"generic_{counter}-{stamp}"
    return name


def _confirm_readonly_fds(ctx: Context, repo: Repo, lines: list[str], *, force: bool) -> None:
    report = "\n".join(lines)
    if force:
        ctx.out(
            f"WARNING: Open file descriptors on {repo.union} (possible race!)\n"
            "         The following lsof report might show the culprit:\n\n"
            f"{report}\n\n"
        )
        return
    ctx.out(
        f"\nWARNING! There are open read-only file descriptors in {repo.union}\n"
        "  --> This is potentially harmful and might cause problems later on.\n"
        "      We can anyway perform the requested operation, but this will most likely\n"
        f"      break other processes with open file descriptors on {repo.union}!\n\n"
        "      The following lsof report might show the processes with open file "
        "handles\n      \n"
        f"{report}\n\n         Do you want to proceed anyway? (y/N) "
    )
    answer = ctx.ask()
    if answer is None or answer.lower() not in ("y", "yes"):
        ctx.out("aborted.\n")
        raise CommandExit(1)


def _run_publish(ctx: Context, job: PublishJob) -> None:
    repo = job.repo
    ctx.fault("before_sync")
    ctx.out(PUBLISH_STEPS_BEFORE_UPLOAD[0])
    previous = repo.catalog(job.manifest.root_hash)
    snap = load_snapshot(repo)
    union = str(repo.union)
    current = scan_tree(repo.union)
    entries, todo = _plan_catalog(ctx, job, previous, snap, current)
    job.copied = len(todo)
    ctx.out(PUBLISH_STEPS_BEFORE_UPLOAD[1])
    half = len(todo) // 2
    ingester = Ingester(job)
    for index, (path, st_info) in enumerate(todo):
        if index == half:
            ctx.fault("upload", lambda rule: _upload_failure(ctx, job, rule))
        try:
            entries[path] = ingester.ingest(union + path, st_info)
        except OSError as exc:
            ctx.err(f"Failed to read {union + path}: {exc.strerror}\nSynchronization failed\n")
            raise CommandExit(1) from None
    if not todo:
        ctx.fault("upload", lambda rule: _upload_failure(ctx, job, rule))
    ctx.fault("after_upload")
    revision = job.manifest.revision + 1
    catalog = Catalog(repo.name, revision, int(job.now), entries)
    ctx.out("Committing file catalogs...\n")
    root_hash, size = store_catalog(repo, catalog)
    ctx.out(
        "Swissknife Sync: Wait for all uploads to finish\n"
        "Swissknife Sync: Exporting repository manifest\n"
        f"Statistics stored at: {repo.spool}/stats.db\n"
    )
    ctx.out(f"Tagging {repo.name}\n")
    _check_served(ctx, repo, root_hash + "C")
    tags = _publish_tags(repo, job, _revision_record(catalog, root_hash, size))
    history = store_history(repo, tags)
    ctx.out("Flushing file system buffers\n")
    ctx.out("Signing new manifest\n")
    ctx.fault(
        "signing",
        lambda rule: ctx.fail_with(
            rule,
            "",
            f"HTTP transfer error 7 (HTTP code -1): {repo.stratum0}/.cvmfsreflog\n"
            "failed loading reflog (3 - network failure)\nreflog missing\nSigning failed\n",
            1,
        ),
    )
    reflog = record_refs(repo, [(root_hash + "C", 0), (history, 2)], job.now)
    repo.add_revision(catalog, root_hash, size)
    repo.write_manifest(
        Manifest(
            root_hash,
            size,
            revision,
            job.manifest.garbage_collectable,
            repo.name,
            job.manifest.certificate,
            history,
            int(job.now),
            job.manifest.meta_info,
            reflog,
        )
    )
    (repo.spool / "client.local").write_text(f"CVMFS_ROOT_HASH={root_hash}\n")
    ctx.fault("after_manifest")
    if auto_gc_due(ctx, repo):
        _publish_auto_gc(ctx, job)
    ctx.out("Remounting newly created repository revision\n")
    _finish_union(repo, catalog, current)
    ctx.pad_until(job.cost(command_costs(ctx.root, "publish"), locked=True))
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    repo.set_mount_state(union_rw=False)
    ctx.fault("end")


def _check_served(ctx: Context, repo: Repo, name: str) -> None:
    """The tag edit reads the new root catalog back over HTTP (local storage): an object
    file that is not world-readable gets a 403 from the web server (faults.md F4)."""
    if repo.is_s3:
        return
    try:
        readable = bool(os.stat(repo.object_file(name)).st_mode & stat.S_IROTH)
    except FileNotFoundError:
        readable = False
    if not readable:
        ctx.err(
            f"failed to download object '{name}' (9 - host returned HTTP error)\nTagging failed\n"
        )
        raise CommandExit(1)


def _plan_catalog(
    ctx: Context,
    job: PublishJob,
    previous: Catalog,
    snap: dict[str, StatInfo],
    current: dict[str, StatInfo],
) -> tuple[dict[str, CatalogEntry], list[tuple[str, StatInfo]]]:
    """Build the new catalog's entries; return them and the files that need uploading."""
    entries: dict[str, CatalogEntry] = {}
    todo: list[tuple[str, StatInfo]] = []
    uid = os.getuid()
    gid = os.getgid()
    grafting = GraftReader(ctx, job)
    for path in sorted(current):
        info = current[path]
        kind, mode, size, mtime_ns = info[0], info[1], info[2], info[3]
        mtime = mtime_ns // 1_000_000_000
        base = path.rsplit("/", 1)[1]
        if kind == "dir":
            entries[path] = CatalogEntry("dir", mode, 4096, mtime, uid, gid)
        elif kind == "symlink":
            entries[path] = CatalogEntry(
                "symlink", 0o777, len(os.fsencode(info[6])), mtime, uid, gid, target=info[6]
            )
        elif kind != "file" or base.startswith(".cvmfsgraft-"):
            continue
        else:
            marker = f"{path.rsplit('/', 1)[0]}/.cvmfsgraft-{base}"
            if marker in current and current[marker][0] == "file":
                entries[path] = grafting.entry(path, marker, info)
                job.grafts += 1
                continue
            old = previous.entries.get(path)
            before = snap.get(path)
            if (
                old is not None
                and old.kind == "file"
                and before is not None
                and snapshot_key(before) == snapshot_key(info)
            ):
                entries[path] = old
            else:
                entries[path] = CatalogEntry("file", mode, size, mtime, uid, gid)
                todo.append((path, info))
    if "/" not in entries:
        entries["/"] = CatalogEntry("dir", 0o755, 4096, int(job.now), uid, gid)
    return entries, todo


class GraftReader:
    """Turns placeholders with a ``.cvmfsgraft-*`` marker into catalog entries.

    One publish may read thousands of markers, so the locations are worked out once and
    the markers are opened by string path.
    """

    def __init__(self, ctx: Context, job: PublishJob) -> None:
        self.ctx = ctx
        self.job = job
        self.union = str(job.repo.union)
        self.scratch = f"{job.repo.spool}/scratch/current"
        self.compression = job.repo.compression
        self.uid = os.getuid()
        self.gid = os.getgid()

    def entry(self, path: str, marker: str, info: StatInfo) -> CatalogEntry:
        """The graft entry for placeholder ``path`` (PANIC like the real tool when invalid)."""
        try:
            with open(self.union + marker, "rb") as handle:
                text = handle.read().decode(errors="replace")
            size, bulk, compression, chunks = parse_graft(
                text, self.compression, self.scratch + marker
            )
        except (GraftError, OSError) as exc:
            self.fail(path, exc.detail if isinstance(exc, GraftError) else None)
        return CatalogEntry(
            "file",
            info[1],
            size,
            info[3] // 1_000_000_000,
            self.uid,
            self.gid,
            hash=bulk,
            compression=compression,
            chunks=chunks,
            graft=True,
        )

    def fail(self, path: str, detail: str | None) -> NoReturn:
        """The real tool's PANIC about invalid grafting information; the transaction stays."""
        ctx = self.ctx
        job = self.job
        if detail:
            ctx.out(detail + "\n")
        ctx.err(
            "terminate called after throwing an instance of 'ECvmfsException'\n"
            f"  what():  PANIC: {SOURCE_PLACEHOLDER}/cvmfs/sync_mediator.cc : 965\n"
            f"Encountered a grafted file ({path[1:]}) with invalid grafting information; "
            "check contents of .cvmfsgraft-* file.  Aborting publish.\n"
            "Killed\nSynchronization failed\n\nExecuted Command:\n"
            + swissknife_command(job.repo, job.manifest.root_hash, job.tag_name, job.message)
            + "\n"
        )
        raise CommandExit(1)


def _upload_failure(ctx: Context, job: PublishJob, rule: dict[str, Any]) -> NoReturn:
    repo = job.repo
    key = job.uploaded[-1] if job.uploaded else "0" * 40 + "P"
    location = f"{repo.name}/data/{key[:2]}/{key[2:]}"
    if repo.is_s3:
        staged = repo.spool / f"tmp.{os.urandom(4).hex()[:6]}"
        staged.write_bytes(zlib.compress(os.urandom(1024)))
    ctx.fail_with(
        rule,
        "",
        f"Upload job for '{location}' failed. (error code: 5 - S3: host connection problem)\n"
        "terminate called after throwing an instance of 'ECvmfsException'\n"
        f"  what():  PANIC: {SOURCE_PLACEHOLDER}/cvmfs/ingestion/task_write.cc : 32\n"
        "chunk upload failed (code: 99)\nKilled\nSynchronization failed\n\n"
        "Executed Command:\n"
        + swissknife_command(repo, job.manifest.root_hash, job.tag_name, job.message)
        + "\n",
        1,
    )


class Ingester:
    """Compresses and stores regular files for one publish (settings looked up once)."""

    def __init__(self, job: PublishJob) -> None:
        repo = job.repo
        self.job = job
        self.repo = repo
        self.chunk_size = int(repo.conf.get("CVMFS_AVG_CHUNK_SIZE", "8388608"))
        self.chunking = repo.flag("CVMFS_USE_FILE_CHUNKING", default=True)
        self.compression = repo.compression
        self.uid = os.getuid()
        self.gid = os.getgid()

    def ingest(self, path: str, info: StatInfo) -> CatalogEntry:
        """Store one regular file (chunked when larger than the average chunk)."""
        repo = self.repo
        compress = self.compression == "zlib"
        uploaded = self.job.uploaded
        entry = CatalogEntry(
            "file",
            info[1],
            0,
            info[3] // 1_000_000_000,
            self.uid,
            self.gid,
            compression=self.compression,
        )
        with open(path, "rb") as handle:
            if not self.chunking or info[2] <= self.chunk_size:
                data = handle.read()
                entry.size = len(data)
                entry.hash = repo.store_object(zlib.compress(data) if compress else data)
                uploaded.append(entry.hash)
                return entry
            offset = 0
            while True:
                piece = handle.read(self.chunk_size)
                if not piece:
                    break
                name = repo.store_object(zlib.compress(piece) if compress else piece, "P")
                uploaded.append(name)
                entry.chunks.append((name[:-1], offset, len(piece)))
                offset += len(piece)
            entry.size = offset
        return entry


def _publish_tags(repo: Repo, job: PublishJob, record: dict[str, Any]) -> list[dict[str, Any]]:
    tags = repo.tags()
    if job.tag_name:
        tags.append(_tag(job.tag_name, record, job.message or ""))
    old_trunk = next((t for t in tags if t.get("name") == "trunk"), None)
    tags = [t for t in tags if t.get("name") not in ("trunk", "trunk-previous")]
    if old_trunk is not None:
        tags.append(dict(old_trunk, name="trunk-previous", description="default undo target"))
    tags.append(_tag("trunk", record, "current HEAD"))
    span = parse_timespan(repo.conf.get("CVMFS_AUTO_TAG_TIMESPAN", ""))
    if span is not None:
        limit = job.now - span
        tags = [
            t
            for t in tags
            if not (
                str(t.get("name", "")).startswith("generic")
                and int(t.get("timestamp", 0)) < limit
                and t.get("name") != job.tag_name
            )
        ]
    return tags


TIMESPAN_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}


def parse_timespan(text: str) -> float | None:
    """Parse ``N <unit>(s) ago`` (the form ``CVMFS_AUTO_TAG_TIMESPAN`` usually takes)."""
    match = re.match(r"^\s*(\d+)\s*(second|minute|hour|day|week)s?(\s+ago)?\s*$", text)
    if match is None:
        return None
    return int(match.group(1)) * TIMESPAN_UNITS[match.group(2)]


def _finish_union(repo: Repo, catalog: Catalog, current: dict[str, StatInfo]) -> None:
    """After a publish: drop graft markers, show grafted content, snapshot the union.

    The snapshot is ``current`` (the scan the catalog was built from) with the removed
    paths left out and the paths changed here (grafted files, directories) stat'ed
    again; the real union is read-only from here on, so anything else that changed
    since the scan is a change outside the transaction.
    """
    union = str(repo.union)
    snap = dict(current)
    consumed: set[str] = set()
    leftover: list[str] = []
    changed: list[str] = []
    for path, entry in catalog.entries.items():
        if entry.graft:
            parent, _, base = path.rpartition("/")
            marker = f"{parent}/.cvmfsgraft-{base}"
            if _graft_into_marker(repo, union + marker, union + path, entry):
                consumed.add(marker)
                del snap[marker]
            else:
                leftover.append(path)
            changed.append(path)
    for path, info in current.items():
        kind = info[0]
        if path in consumed:
            continue
        if (kind == "file" and path.rpartition("/")[2].startswith(".cvmfsgraft-")) or (
            kind not in ("file", "dir", "symlink") and path != "/"
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(union + path)
            del snap[path]
    for path in leftover:
        with contextlib.suppress(OSError):
            _materialise(repo, Path(union + path), catalog.entries[path])
    directories = sorted((p for p, e in catalog.entries.items() if e.kind == "dir"), reverse=True)
    for path in directories:
        mtime = catalog.entries[path].mtime
        with contextlib.suppress(OSError):
            os.utime(union if path == "/" else union + path, (mtime, mtime))
    for path in itertools.chain(changed, directories):
        try:
            snap[path] = _stat_info(os.lstat(union if path == "/" else union + path), "")
        except FileNotFoundError:
            snap.pop(path, None)
    save_snapshot(repo, snap)


def _graft_into_marker(repo: Repo, marker: str, dest: str, entry: CatalogEntry) -> bool:
    """Show a grafted file's content at ``dest`` by turning its marker into the file.

    The marker is rewritten with the content (unreadable content leaves it empty, as
    ``_materialise`` does), given the entry's mode and mtime and renamed over the
    placeholder: the union ends up as after ``_materialise`` plus removing the marker, but
    the marker's storage is reused instead of freed and allocated again, which on some
    file systems is by far the dearest part of a publish of many small grafts. Returns
    False when the marker cannot be reused (not a single-link regular file, or any
    error before the rename); the caller then removes it and materialises.
    """
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        written = 0
        try:
            for piece in iter_file_content(repo, entry):
                view = memoryview(piece)
                while view:
                    done = os.pwrite(fd, view, written)
                    written += done
                    view = view[done:]
        except OSError as exc:
            if exc.errno != errno.EIO:
                return False
            written = 0
        if written < st.st_size:
            os.ftruncate(fd, written)
        os.fchmod(fd, entry.mode)
        os.utime(fd, (entry.mtime, entry.mtime))
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rename(marker, dest)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------
# abort
# --------------------------------------------------------------------------------------


def cmd_abort(ctx: Context, args: list[str]) -> None:
    """``abort [-f] REPO[/path]``."""
    opts, rest = parse_options(args, "f")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server abort [-f] <repository name>\n")
        raise CommandExit(1)
    name, _ = split_repo_arg(rest[0])
    repo = require_repo(ctx, name)
    ctx.fault(
        "start",
        lambda rule: ctx.fail_with(
            rule,
            "",
            "(unexpected termination) cannot load whitelist [failed to download "
            "whitelist]\n" + TRACE_PUBLISHER,
            1,
        ),
    )
    if not any(key == "-f" for key, _ in opts):
        ctx.out(
            f"You are about to DISCARD ALL CHANGES OF THE CURRENT TRANSACTION for "
            f"{repo.name}!  Are you sure (y/N)? "
        )
        answer = ctx.ask()
        if answer is not None and answer.lower() not in ("y", "yes"):
            raise CommandExit(4)
    ctx.lock_repo(repo)
    check_union_violations(ctx, repo)
    _abort_mount_checks(ctx, repo)
    if cwd_inside(repo.union):
        ctx.out(
            f"Current working directory is in {repo.union}.  Please release, e.g. by 'cd $HOME'.\n"
        )
        raise CommandExit(1)
    problem = whitelist_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"(unexpected termination) cannot load whitelist [{problem}]\n" + TRACE_PUBLISHER)
        raise CommandExit(1)
    if not repo.in_transaction():
        ctx.err(f"Repository {repo.name} is not in a transaction\n")
        raise CommandExit(22)
    if (repo.spool / "is_collecting.lock").exists():
        ctx.err(f"Repository {repo.name} is busy: garbage collection is running\n")
        raise CommandExit(1)
    catalog = repo.catalog(repo.manifest().root_hash)
    sync_union(repo, catalog, load_snapshot(repo))
    save_snapshot(repo, scan_tree(repo.union))
    ctx.fault("after_restore")
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    repo.set_mount_state(union_rw=False, union_mounted=True, rdonly_mounted=True)
    ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))


def _abort_mount_checks(ctx: Context, repo: Repo) -> None:
    state = repo.mount_state()
    if state["union_mounted"] and state["rdonly_mounted"]:
        return
    if not repo.flag("CVMFS_AUTO_REPAIR_MOUNTPOINT", default=True):
        repair_mounts(ctx, repo, style="publish")
        ctx.err("Auto-Repair is disabled (CVMFS_AUTO_REPAIR_MOUNTPOINT = false)\n")
        raise CommandExit(1)
    in_txn = repo.in_transaction()
    repair_mounts(ctx, repo, style="transaction")
    if in_txn and not state["union_mounted"]:
        ctx.err(f"Trying to remount {repo.union} read/write... success\n")


# --------------------------------------------------------------------------------------
# list, info, mount
# --------------------------------------------------------------------------------------


def cmd_list(ctx: Context, args: list[str]) -> None:
    """``list``: every repository with its status."""
    del args
    ctx.fault("start")
    for name in list_repositories(ctx.root):
        repo = Repo(ctx.root, name)
        ctx.repo_name = name
        if ctx.lock_repo(repo, wait=False):
            check_union_violations(ctx, repo)
            ctx.release_locks()
        parts = ["S3" if repo.is_s3 else "local"]
        if repo.in_transaction():
            parts.append("in transaction")
        state = repo.mount_state()
        if not (state["union_mounted"] and state["rdonly_mounted"]):
            parts.append("unhealthy")
        problem = whitelist_problem(ctx, repo)
        if problem == "expired whitelist":
            parts.append("whitelist expired")
        elif problem == "failed to download whitelist":
            parts.append("whitelist unreachable")
        elif problem == "malformed whitelist":
            parts.append("whitelist malformed")
        ctx.out(f"{name} (stratum0 / {' - '.join(parts)})  \n")


def cmd_info(ctx: Context, args: list[str]) -> None:
    """``info REPO``."""
    if len(args) != 1:
        ctx.err("usage: cvmfs_server info <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(args[0])[0])
    ctx.fault("start")
    problem = whitelist_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"(unexpected termination) cannot load whitelist [{problem}]\n" + TRACE_REPOSITORY)
        raise CommandExit(1)
    expiry = repo.whitelist().expiry() or 0.0
    days = int((expiry - ctx.now()) // 86400)
    pub = repo.key("pub")
    ctx.out(
        f"Repository name: {repo.name}\n"
        f"Created by CernVM-FS {repo.conf.get('CVMFS_CREATOR_VERSION', CREATOR_VERSION)}\n"
        "Stratum1 replication allowed: "
        f"{'yes' if (repo.storage / '.cvmfs_master_replica').exists() else 'no'}\n"
        f"Whitelist is valid for another {days} days\n"
        "\n"
        "Client configuration:\n"
        f"Add {repo.name} to CVMFS_REPOSITORIES in /etc/cvmfs/default.local\n"
        f"Create /etc/cvmfs/config.d/{repo.name}.conf and set\n"
        f"  CVMFS_SERVER_URL={repo.stratum0}\n"
        f"  CVMFS_PUBLIC_KEY={pub}\n"
        f"Copy {pub} to the client\n"
    )


def cmd_mount(ctx: Context, args: list[str]) -> None:
    """``mount REPO`` / ``mount -a``: repair missing mounts silently."""
    opts, rest = parse_options(args, "a")
    if any(key == "-a" for key, _ in opts):
        names = list_repositories(ctx.root)
    elif len(rest) == 1:
        names = [split_repo_arg(rest[0])[0]]
        require_repo(ctx, names[0])
    else:
        ctx.err("usage: cvmfs_server mount <repository name> | -a\n")
        raise CommandExit(1)
    ctx.fault("start")
    for name in names:
        repo = Repo(ctx.root, name)
        ctx.repo_name = name
        ctx.storage_fault()
        ctx.lock_repo(repo)
        check_union_violations(ctx, repo)
        state = repo.mount_state()
        if not state["rdonly_mounted"]:
            ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))
            repo.set_mount_state(rdonly_mounted=True)
        if not state["union_mounted"]:
            repo.set_mount_state(union_mounted=True, union_rw=repo.in_transaction())
            if not repo.in_transaction():
                remount_published(repo)
        ctx.release_locks()


# --------------------------------------------------------------------------------------
# resign
# --------------------------------------------------------------------------------------


def cmd_resign(ctx: Context, args: list[str]) -> None:
    """``resign [-d DAYS] [-p] [-f] REPO``."""
    opts, rest = parse_options(args, "d:pfw:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server resign [-d days] [-p] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    options = dict(opts)
    ctx.fault("start")
    ctx.lock_repo(repo)
    if ctx.storage_fault() == "unreachable":
        ctx.err(f"failed to upload the signature of {repo.name} (storage unreachable)\n")
        raise CommandExit(1)
    if "-p" in options:
        manifest = repo.manifest()
        manifest.timestamp = int(ctx.now())
        reflog = repo.reflog()
        reflog["resigned"] = manifest.timestamp
        data = json.dumps(reflog, sort_keys=True).encode()
        write_atomic(repo.storage / ".cvmfsreflog", data)
        manifest.reflog = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        (repo.spool / "reflog.chksum").write_text(manifest.reflog)
        repo.write_manifest(manifest)
        ctx.out("Signing .cvmfspublished... done\n")
        return
    if not repo.key("masterkey").is_file():
        ctx.err(f"Master key {repo.key('masterkey')} not found; cannot resign the whitelist\n")
        raise CommandExit(1)
    days = options.get("-d", "30")
    if days.isdigit() and int(days) > 30:
        ctx.out(
            "Warning: whitelist expiration is more than 30 days.\n"
            "Long expirations increase risk from repository key compromises!\n"
        )
    elif not days.isdigit():
        ctx.err(
            f"/usr/bin/cvmfs_server: 6037: [: Illegal number: {days}\n"
            f"date: invalid date '+{days} days'\n"
        )
    write_whitelist(repo, ctx.now(), days)
    ctx.out(f"Signing {days} day whitelist with master key... done\n")


# --------------------------------------------------------------------------------------
# tag
# --------------------------------------------------------------------------------------


def _manifest_problem(ctx: Context, repo: Repo) -> str | None:
    problem = whitelist_problem(ctx, repo)
    if problem == "failed to download whitelist":
        return "3 - network failure"
    if problem is not None:
        return "8 - bad whitelist"
    return None


def cmd_tag(ctx: Context, args: list[str]) -> None:
    """``tag [-l] [-x] [-i NAME] [-a NAME [-m MSG] [-h HASH]] [-r NAME] [-f] REPO``."""
    opts, rest = parse_options(args, "lxi:a:m:h:r:fb:B:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server tag [options] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    ctx.fault("start")
    problem = _manifest_problem(ctx, repo)
    if problem is not None:
        ctx.err(
            f"failed to fetch repository manifest ({problem})\n"
            "failed to load manifest file\nfailed to init environment\n"
        )
        raise CommandExit(1)
    flags = {key for key, _ in opts}
    values = dict(opts)
    removals = [value for key, value in opts if key == "-r"]
    if "-a" in values:
        ctx.lock_repo(repo)
        _tag_add(ctx, repo, values["-a"], values.get("-m", ""), values.get("-h"))
    elif removals:
        ctx.lock_repo(repo)
        _tag_remove(ctx, repo, removals, force="-f" in flags)
    elif "-i" in values:
        _tag_inspect(ctx, repo, values["-i"])
    elif "-x" in flags:
        for tag in _tags_machine_order(repo.tags()):
            ctx.out(
                f"{tag['name']} {tag['hash']} {tag['size']} {tag['revision']} "
                f"{tag['timestamp']} (default) {tag.get('description', '')}\n"
            )
    else:
        _tag_table(ctx, list(reversed(_tags_machine_order(repo.tags()))))


def _tags_machine_order(tags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    indexed = list(enumerate(tags))
    indexed.sort(key=lambda pair: (-int(pair[1]["revision"]), pair[0]))
    return [tag for _, tag in indexed]


def _tag_table(ctx: Context, tags: list[dict[str, Any]]) -> None:
    width = max([4, *(len(str(t["name"])) for t in tags)])
    ctx.out(f"{'Name':<{width}} │ Revision │ Timestamp            │ Branch │ Description\n")
    ctx.out(
        "─" * (width + 1) + "┼" + "─" * 10 + "┼" + "─" * 22 + "┼" + "─" * 8 + "┼" + "─" * 13 + "\n"
    )
    for tag in tags:
        stamp = utc("%d %b %Y %H:%M:%S", float(tag["timestamp"]))
        ctx.out(
            f"{tag['name']:<{width}} │ {tag['revision']:>8} │ {stamp} │ "
            f"{tag.get('branch', ''):<6} │ {tag.get('description', '')}\n"
        )
    ctx.out(
        "─" * (width + 1) + "┴" + "─" * 10 + "┴" + "─" * 22 + "┴" + "─" * 8 + "┴" + "─" * 13 + "\n"
    )
    ctx.out(f"listing contains {len(tags)} tags\n")


def _tag_inspect(ctx: Context, repo: Repo, name: str) -> None:
    tag = next((t for t in repo.tags() if t.get("name") == name), None)
    if tag is None:
        ctx.err(f"tag '{name}' does not exist\n")
        raise CommandExit(1)
    stamp = utc("%d %b %Y %H:%M:%S", float(tag["timestamp"]))
    ctx.out(
        f"Name:         {tag['name']}\nRevision:     {tag['revision']}\n"
        f"Timestamp:    {stamp}\nBranch:       {tag.get('branch', '')}\n"
        f"Root Hash:    {tag['hash']}\n"
        f"Catalog Size: {int(tag['size']) / 1024:.3f} kiB\n"
        f"{tag.get('description', '')}\n"
    )


def _save_tags(ctx: Context, repo: Repo, tags: list[dict[str, Any]]) -> None:
    manifest = repo.manifest()
    history = store_history(repo, tags)
    manifest.history = history
    manifest.reflog = record_refs(repo, [(history, 2)], ctx.now())
    repo.write_manifest(manifest)


def _tag_add(ctx: Context, repo: Repo, name: str, message: str, root_hash: str | None) -> None:
    tags = repo.tags()
    if name in ("trunk", "trunk-previous") or any(t.get("name") == name for t in tags):
        ctx.err(f"a tag with the name '{name}' already exists\n")
        raise CommandExit(1)
    trunk = next(t for t in tags if t.get("name") == "trunk")
    source = trunk
    if root_hash is not None:
        match = next((t for t in tags if t.get("hash") == root_hash), None)
        rev = next((r for r in repo.revisions() if r["root_hash"] == root_hash), None)
        if match is None and rev is None:
            ctx.err(f"root hash {root_hash} is not a revision of {repo.name}\n")
            raise CommandExit(1)
        if match is None and rev is not None:
            match = _tag("", rev, "")
        source = match or trunk
    tags.append(dict(source, name=name, description=message, branch=""))
    _save_tags(ctx, repo, tags)


# Linux's limit on the length of one argument (MAX_ARG_STRLEN, the terminating NUL
# included): execve fails with E2BIG beyond it (faults.md F1).
MAX_ARG_STRLEN = 131072
# Line of /usr/bin/cvmfs_server that runs the tag_edit shell; faults.md F1 elides it, so
# this number is a stand-in, not a recorded value.
TAG_REMOVE_SCRIPT_LINE = 1203


def tag_remove_shell_argument(repo: Repo, names: list[str]) -> str:
    """The single ``sh -c`` argument ``cvmfs_server tag -r`` builds for ``tag_edit``.

    cvmfs_server_tag.sh writes the command inside one double-quoted string continued with
    backslash-newlines, so the padding of its source lines stays in the argument; every
    name of the call goes into ``-d '<name> <name> ...'`` (faults.md F1).
    """
    try:
        base_hash = repo.manifest().root_hash
    except (OSError, ValueError):
        base_hash = ""
    lines = (
        "/usr/bin/cvmfs_swissknife tag_edit        ",
        f"      -w {repo.stratum0}                                 ",
        f"      -t {repo.spool}/tmp                          ",
        f"      -p {repo.key('pub')}                     ",
        f"      -z {repo.repo_conf_dir}/trusted_certs ",
        f"      -f {repo.name}                                           ",
        f"      -r {repo.conf.get('CVMFS_UPSTREAM_STORAGE', '')}                         ",
        f"      -m {repo.spool}/tmp/manifest                                   ",
        f"      -b {base_hash}                                      ",
        f"      -e {repo.hash_algorithm}                                 ",
        "      -d '" + " ".join(names) + "'",
    )
    return "".join(lines)


def _tag_remove(ctx: Context, repo: Repo, names: list[str], *, force: bool) -> None:
    """``tag -r NAME [-r NAME ...]``: all names or none (faults.md F1, swissknife's
    ``RemoveTags``): any undo tag or any missing name and nothing is removed."""
    tags = repo.tags()
    if not force:
        ctx.out(f"You are about to remove {len(names)} tag(s) of {repo.name}. Are you sure (y/N)? ")
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    argument = tag_remove_shell_argument(repo, names)
    if len(argument.encode("utf-8", "surrogateescape")) + 1 > MAX_ARG_STRLEN:
        ctx.err(
            f"/usr/bin/cvmfs_server: {TAG_REMOVE_SCRIPT_LINE}: eval: sh: Argument list too long\n"
            "Did not remove anything\n"
        )
        raise CommandExit(1)
    if any(name in ("trunk", "trunk-previous") for name in names):
        ctx.err("undo tags are handled internally and cannot be deleted\nDid not remove anything\n")
        raise CommandExit(1)
    by_name = {str(t.get("name")): t for t in tags}
    missing = [name for name in names if name not in by_name]
    if missing:
        ctx.err("".join(f"tag '{name}' does not exist\n" for name in missing))
        ctx.err("Did not remove anything\n")
        raise CommandExit(1)
    condemned: set[str] = set()
    for name in names:
        if name in condemned:
            continue
        ctx.out(f"deleting '{name}' ({by_name[name]['hash']})\n")
        condemned.add(name)
    _save_tags(ctx, repo, [t for t in tags if str(t.get("name")) not in condemned])


# --------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------


def cmd_check(ctx: Context, args: list[str]) -> None:
    """``check [-i] [-c] [-t TAG] REPO``."""
    opts, rest = parse_options(args, "icst:r:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server check [-i] [-c] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0], period=False)
    flags = {key for key, _ in opts}
    values = dict(opts)
    ctx.fault("start")
    if "-i" in flags and repo.is_s3:
        # faults.md F3, p_gateway_maintenance 8: only local storage is scanned
        ctx.out("Storage integrity check only works locally. skipping.\n")
    elif "-i" in flags:
        ctx.out(f"\nChecking storage integrity of {repo.name} ... (may take a while)\n")
        bad = _scan_storage_integrity(repo)
        if bad:
            ctx.err(
                "".join(f"mismatch of file name and content hash | at: {path}\n" for path in bad)
                + "FAIL!\n"
            )
            raise CommandExit(1)
    ctx.out(f"Verifying integrity of {repo.name}...\n")
    problem = _manifest_problem(ctx, repo)
    if problem is not None:
        ctx.err(
            f"failed to fetch repository manifest ({problem})\nfailed to load repository manifest\n"
        )
        raise CommandExit(1)
    ctx.out("Inspecting log of references\nInspecting tag database\n")
    root_hash = repo.manifest().root_hash
    if "-t" in values:
        tag = next((t for t in repo.tags() if t.get("name") == values["-t"]), None)
        if tag is None:
            ctx.err(f"tag '{values['-t']}' does not exist\n")
            raise CommandExit(1)
        root_hash = str(tag["hash"])
    ctx.out(f"[inspecting catalog] {root_hash} at /\n")
    try:
        catalog = repo.catalog(root_hash)
    except (OSError, ValueError):
        ctx.err(
            f"failed to download object {root_hash} (9)\n"
            f"failed to load catalog {root_hash}\nfailed to open catalog {root_hash}\n"
            "CATALOG PROBLEMS OR OTHER ERRORS FOUND\n"
        )
        raise CommandExit(1) from None
    problems = [] if "-c" in flags else _missing_objects(repo, catalog)
    if problems:
        ctx.err("".join(problems) + "CATALOG PROBLEMS OR OTHER ERRORS FOUND\n")
        raise CommandExit(1)
    ctx.out("no problems found\n")


def _scan_storage_integrity(repo: Repo) -> list[str]:
    bad: list[str] = []
    for sub in sorted(p for p in repo.data.iterdir() if p.is_dir() and len(p.name) == 2):
        for item in sorted(sub.iterdir()):
            if not item.is_file():
                continue
            if not verify_object_bytes(sub.name + item.name, item.read_bytes()):
                bad.append(str(item))
    return bad


def _missing_objects(repo: Repo, catalog: Catalog) -> list[str]:
    problems: list[str] = []
    for path in sorted(catalog.entries):
        entry = catalog.entries[path]
        if entry.kind != "file":
            continue
        if entry.hash is not None and not repo.object_file(entry.hash).is_file():
            problems.append(f"data chunk {entry.hash} ({path}) missing\n")
        for chunk_hash, offset, size in entry.chunks:
            if not repo.object_file(chunk_hash + "P").is_file():
                problems.append(
                    f"partial data chunk {chunk_hash}P ({path} -> offset: "
                    f"{offset} | size: {size}) missing\n"
                )
    return problems


# --------------------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------------------


def parse_gc_time(text: str, now: float) -> float | None:
    """Parse ``gc -t`` like ``date -d``: ``@SECONDS``, ``YYYY-MM-DD[ HH:MM[:SS]]`` (UTC)
    or ``N units ago``."""
    if re.fullmatch(r"@-?\d+(\.\d+)?|\d{9,}", text):
        return float(text.lstrip("@"))
    for fmt in (
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d",
        "%Y-%m-%dT%H:%M:%S",
        "%Y/%m/%d %H:%M:%S",
    ):
        try:
            return utc_seconds(time.strptime(text, fmt))
        except ValueError:
            continue
    span = parse_timespan(text)
    return None if span is None else now - span


class GcPlan:
    """What one gc run keeps and removes."""

    def __init__(
        self, preserved: list[dict[str, Any]], swept: list[dict[str, Any]], threshold: float
    ) -> None:
        self.preserved = preserved
        self.swept = swept
        self.threshold = threshold


def cmd_gc(ctx: Context, args: list[str]) -> None:
    """``gc [-r N] [-t TIME] [-f] [-d] [-l] REPO``."""
    opts, rest = parse_options(args, "r:t:fdlLa")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server gc [options] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    flags = {key for key, _ in opts}
    values = dict(opts)
    dry = "-d" in flags
    now = ctx.now()
    keep_revisions: int | None = None
    threshold = now - GC_DEFAULT_TIMESPAN
    if "-r" in values:
        if not values["-r"].isdigit():
            ctx.err(f"invalid number of revisions: {values['-r']}\n")
            raise CommandExit(1)
        keep_revisions = int(values["-r"])
    if "-t" in values:
        parsed = parse_gc_time(values["-t"], now)
        if parsed is None:
            ctx.err(f"cannot parse time stamp: {values['-t']}\n")
            raise CommandExit(1)
        threshold = parsed
    ctx.fault("start")
    header = (
        f"Affected Repositories:          {repo.name}\n"
        f"Dry Run (no actual deletion):  {'yes' if dry else 'no'}\n"
        "Needs Reflog reconstruction:   no\n"
    )
    if keep_revisions is not None:
        header += f"Preserved Legacy Revisions:    {keep_revisions}\n"
        if keep_revisions == 0:
            header += "Only the latest revision will be preserved.\n"
    else:
        header += f"Preserve Revisions newer than: {utc('%Y/%m/%d %H:%M:%S', threshold)}\n"
    if "-f" not in flags:
        ctx.out(
            "YOU ARE ABOUT TO DELETE DATA! Are you sure you want to do the following:\n"
            + header
            + "\n"
        )
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    else:
        ctx.out(header)
    if not repo.flag("CVMFS_GARBAGE_COLLECTION"):
        ctx.err(f"Garbage Collection is not enabled for {repo.name}\n")
        raise CommandExit(1)
    ctx.lock_repo(repo)
    if not dry and repo.in_transaction():
        ctx.err("Cannot run garbage collection while in a transaction\n")
        raise CommandExit(1)
    problem = _manifest_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"failed to fetch repository manifest ({problem})\n")
        raise CommandExit(1)
    _run_gc(ctx, repo, keep_revisions, threshold, dry=dry, listing="-l" in flags)


def _gc_plan(repo: Repo, keep_revisions: int | None, threshold: float) -> GcPlan:
    manifest = repo.manifest()
    tagged = {int(t["revision"]) for t in repo.tags()}
    existing = [
        r for r in repo.revisions() if repo.object_file(str(r["root_hash"]) + "C").is_file()
    ]
    head = manifest.revision
    keep = {head} | tagged
    older = sorted(
        (int(r["revision"]) for r in existing if int(r["revision"]) < head), reverse=True
    )
    if keep_revisions is not None:
        keep |= set(older[:keep_revisions])
        aux_threshold = next(
            (float(r["timestamp"]) for r in existing if int(r["revision"]) == head), threshold
        )
    else:
        keep |= {int(r["revision"]) for r in existing if float(r["timestamp"]) >= threshold}
        aux_threshold = threshold
    preserved = [r for r in existing if int(r["revision"]) in keep]
    preserved.sort(key=lambda r: (int(r["revision"]) != head, int(r["revision"])))
    swept = sorted(
        (r for r in existing if int(r["revision"]) not in keep), key=lambda r: -int(r["revision"])
    )
    return GcPlan(preserved, swept, aux_threshold)


def _run_gc(
    ctx: Context,
    repo: Repo,
    keep_revisions: int | None,
    threshold: float,
    *,
    dry: bool,
    listing: bool,
) -> None:
    plan = _gc_plan(repo, keep_revisions, threshold)
    locks = [repo.spool / "in_transaction.lock", repo.spool / "is_collecting.lock"]
    if not dry:
        for lock in locks:
            lock.touch()
        locks[0].chmod(0o600)
    try:
        ctx.fault("locked")
        ctx.out("Running Garbage Collection \n")
        collect_garbage(ctx, repo, plan, dry=dry, listing=listing)
    finally:
        if not dry:
            for lock in locks:
                lock.unlink(missing_ok=True)


def collect_garbage(
    ctx: Context,
    repo: Repo,
    plan: GcPlan,
    *,
    dry: bool,
    listing: bool,
    fail: Callable[[dict[str, Any]], NoReturn] | None = None,
) -> None:
    """What ``cvmfs_swissknife gc`` and the shell's ``__run_gc`` do, shared by ``gc`` and
    publish's automatic gc: mark and sweep, then record ``last_gc`` in the storage's
    ``.cvmfs_status.json``. ``fail`` is the failure of the ``sweep`` fault point."""
    _gc_sweep(ctx, repo, plan, dry=dry, listing=listing, fail=fail)
    if not dry:
        ctx.out(f"Statistics stored at: {repo.spool}/stats.db\n")
        write_gc_status(repo, ctx.now())


def write_gc_status(repo: Repo, when: float) -> None:
    """Record a finished gc in ``.cvmfs_status.json`` (``last_gc`` as ``date --utc`` prints it)."""
    status = read_json(repo.storage / ".cvmfs_status.json", {})
    if not isinstance(status, dict):
        status = {}
    status["last_gc"] = utc(LAST_GC_FORMAT, when)
    write_atomic(repo.storage / ".cvmfs_status.json", json.dumps(status, indent=2).encode())


def parse_last_gc(text: str) -> float | None:
    """Parse ``last_gc`` (``date --utc`` output, e.g. ``Sun Nov 29 21:15:48 UTC 2026``)."""
    try:
        return utc_seconds(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S UTC %Y"))
    except ValueError:
        return parse_gc_time(text, time.time()) if text else None


def auto_gc_enabled(repo: Repo) -> bool:
    """``is_garbage_collectable`` and ``CVMFS_AUTO_GC``: both compared with "true" verbatim."""
    conf = repo.conf
    return conf.get("CVMFS_GARBAGE_COLLECTION") == "true" and conf.get("CVMFS_AUTO_GC") == "true"


def auto_gc_due(ctx: Context, repo: Repo) -> bool:
    """The shell's ``is_due_auto_garbage_collection``.

    Due when automatic gc is enabled and ``last_gc`` is older than ``CVMFS_AUTO_GC_LAPSE``
    (``date --date`` syntax, default "1 day ago"); also due when there is no ``last_gc``
    or either date cannot be parsed (with the script's messages on stderr).
    """
    if not auto_gc_enabled(repo):
        return False
    lapse = repo.conf.get("CVMFS_AUTO_GC_LAPSE") or AUTO_GC_DEFAULT_LAPSE
    deadline = parse_gc_time(lapse, ctx.now())
    if deadline is None:
        ctx.err(f"Failed to parse CVMFS_AUTO_GC_LAPSE: '{lapse}'\n")
        return True
    status = read_json(repo.storage / ".cvmfs_status.json", {})
    text = str(status.get("last_gc") or "") if isinstance(status, dict) else ""
    if not text:
        return True
    last_gc = parse_last_gc(text)
    if last_gc is None:
        # the script reassigns the variable before printing it, so the message is empty
        ctx.err("Failed to parse last gc timestamp: ''\n")
        return True
    return int(last_gc) < int(deadline)


def auto_gc_threshold(ctx: Context, repo: Repo, now: float) -> float:
    """``get_auto_garbage_collection_timespan``: revisions newer than this survive auto gc.

    Publish computes it before doing anything, for every repository (gc enabled or not),
    and stops with exit 1 when ``CVMFS_AUTO_GC_TIMESPAN`` cannot be parsed.
    """
    text = repo.conf.get("CVMFS_AUTO_GC_TIMESPAN") or AUTO_GC_DEFAULT_TIMESPAN
    threshold = parse_gc_time(text, now)
    if threshold is None:
        ctx.err(f"Failed to parse CVMFS_AUTO_GC_TIMESPAN: '{text}'\n")
        raise CommandExit(1)
    return threshold


def _publish_auto_gc(ctx: Context, job: PublishJob) -> None:
    """Publish's automatic gc (F10): after the new manifest is signed and before the remount.

    It runs inside the publish's own transaction (no ``is_collecting.lock``), preserves the
    new revision, every tagged revision and revisions newer than the auto-gc timespan, and
    prints swissknife's gc lines without a listing. A failure ends the publish with
    ``Garbage collection failed (6)`` and the transaction open; the new revision stays.
    """

    def failed(rule: dict[str, Any]) -> NoReturn:
        ctx.fail_with(rule, "", "Garbage collection failed (6)\n", 1)

    repo = job.repo
    job.auto_gc = True
    ctx.out("Running automatic garbage collection\n")
    ctx.fault("auto_gc", failed)
    plan = _gc_plan(repo, None, job.gc_threshold)
    collect_garbage(ctx, repo, plan, dry=False, listing=False, fail=failed)


def _gc_sweep(
    ctx: Context,
    repo: Repo,
    plan: GcPlan,
    *,
    dry: bool,
    listing: bool,
    fail: Callable[[dict[str, Any]], NoReturn] | None = None,
) -> None:
    def stamp() -> str:
        return utc("[%a, %d %b %Y %H:%M:%S GMT]", ctx.now())

    def day(value: float) -> str:
        return utc("%d %b %Y %H:%M:%S", value)

    ctx.out(f"  --> marking unreferenced objects {stamp()}\n")
    keep_objects: set[str] = set()
    if listing:
        ctx.out("Preserving data objects in latest revision\n")
    for rev in plan.preserved:
        with contextlib.suppress(OSError, ValueError):
            catalog = repo.catalog(str(rev["root_hash"]))
            for entry in catalog.entries.values():
                keep_objects.update(entry.objects())
        if listing:
            ctx.out(
                f"Preserving Revision {rev['revision']} ({day(rev['timestamp'])} / "
                f"added @ {day(rev['timestamp'])})\n├─ {rev['root_hash']} /\n"
            )
    ctx.fault("sweep", fail)
    ctx.out(f"  --> sweeping unreferenced objects {stamp()}\n")
    removed: set[str] = set()
    for index, rev in enumerate(plan.swept, start=1):
        root_hash = str(rev["root_hash"])
        if listing:
            ctx.out(
                f"Sweeping Revision {rev['revision']} ({day(rev['timestamp'])})\n├─ {root_hash} /\n"
            )
        names: set[str] = set()
        with contextlib.suppress(OSError, ValueError):
            for entry in repo.catalog(root_hash).entries.values():
                names.update(entry.objects())
        doomed = sorted(n for n in names - keep_objects - removed if repo.object_file(n).is_file())
        for name in [*doomed, root_hash + "C"]:
            if listing:
                ctx.out(f"Sweep: {name}\n")
            removed.add(name)
            if not dry:
                repo.object_file(name).unlink(missing_ok=True)
        if listing:
            percent = index * 100 // len(plan.swept)
            ctx.out(
                f"      - {percent}%    {index} / {len(plan.swept)} unreferenced revisions "
                f"removed {stamp()}\n"
            )
    ctx.out(f"  --> done garbage collecting {stamp()}\n")
    current_history = repo.manifest().history
    old_histories = [
        r
        for r in repo.reflog().get("refs", [])
        if r[1] == 2
        and r[0] != current_history
        and float(r[2]) < plan.threshold
        and repo.object_file(r[0]).is_file()
    ]
    if listing:
        ctx.out(
            f"Sweeping auxiliary objects older than {day(plan.threshold)}\n"
            f"Scanning 0 certificate objects\n"
            f"Scanning {len(old_histories)} tag database objects\n"
        )
        for ref in old_histories:
            ctx.out(f"  sweep: {ref[0]}\n")
        ctx.out("Scanning 0 repository meta information objects\n")
    if dry:
        return
    for ref in old_histories:
        repo.object_file(ref[0]).unlink(missing_ok=True)
        removed.add(ref[0])
    if removed:
        manifest = repo.manifest()
        manifest.reflog = record_refs(repo, [], ctx.now(), drop=removed)
        repo.write_manifest(manifest)


# --------------------------------------------------------------------------------------
# rmfs, diff and fake-only helpers
# --------------------------------------------------------------------------------------


def cmd_rmfs(ctx: Context, args: list[str]) -> None:
    """``rmfs [-f] REPO``: remove configuration, keys, spool, union and storage."""
    opts, rest = parse_options(args, "fp")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server rmfs [-f] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, rest[0])
    if not any(key == "-f" for key, _ in opts):
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    ctx.fault("start")
    ctx.lock_repo(repo)
    import shutil

    storage = repo.storage
    ctx.out("Unmounting CernVM-FS Area... done\n")
    shutil.rmtree(repo.spool, ignore_errors=True)
    shutil.rmtree(repo.union, ignore_errors=True)
    ctx.out("Removing Spool Area... done\n")
    if not repo.is_s3:
        shutil.rmtree(storage, ignore_errors=True)
        ctx.out("Removing Repository Storage... done\n")
    shutil.rmtree(repo.repo_conf_dir, ignore_errors=True)
    ctx.out("Removing Configuration... done\n")
    for ext in ("key", "crt", "pub", "masterkey"):
        repo.key(ext).unlink(missing_ok=True)
    ctx.out("Removing Keys and Certificate... done\n")
    shutil.rmtree(repo.state_dir, ignore_errors=True)
    ctx.out("Updating global JSON information... done\n")
    ctx.out(f"CernVM-FS repository {repo.name} wiped out!\n")


def cmd_diff(ctx: Context, args: list[str]) -> None:
    """``diff [-m] REPO``: what changed between trunk-previous and trunk."""
    opts, rest = parse_options(args, "ms:d:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server diff [-m] <repository name>\n")
        raise CommandExit(1)
    machine = any(key == "-m" for key, _ in opts)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    tags = {str(t["name"]): t for t in repo.tags()}
    new = repo.catalog(str(tags["trunk"]["hash"]))
    old_tag = tags.get("trunk-previous")
    old = repo.catalog(str(old_tag["hash"])) if old_tag else Catalog(repo.name, 0, 0, {})
    labels = {"file": ("file", "F"), "dir": ("directory", "D"), "symlink": ("symlink", "S")}
    counts = {"file": 0, "symlink": 0, "dir": 0}
    lines: list[str] = []
    for path in sorted(set(old.entries) | set(new.entries)):
        before = old.entries.get(path)
        after = new.entries.get(path)
        if path == "/":
            continue
        if before is None and after is not None:
            counts[after.kind] += 1
            word, letter = labels[after.kind]
            suffix = "" if after.kind == "dir" else f" +{after.size}"
            lines.append(
                f"A {letter} {path}{suffix}\n"
                if machine
                else f"{path} add {word} +{after.size} bytes\n"
            )
        elif after is None and before is not None:
            counts[before.kind] -= 1
            word, letter = labels[before.kind]
            suffix = "" if before.kind == "dir" else f" -{before.size}"
            lines.append(
                f"R {letter} {path}{suffix}\n"
                if machine
                else f"{path} remove {word} -{before.size} bytes\n"
            )
        elif before is not None and after is not None and _content_changed(before, after):
            word, letter = labels[after.kind]
            delta = after.size - before.size
            lines.append(
                f"M {letter} {path} {delta:+d}\n"
                if machine
                else f"{path} modify {word} {delta:+d} bytes\n"
            )
    if machine:
        ctx.out(
            f"S F {counts['file']}\nS S {counts['symlink']}\nS D {counts['dir']}\nS N 0\n"
            + "".join(lines)
        )
        return
    ctx.out(
        f"d(# regular files): {counts['file']}\nd(# symlinks): {counts['symlink']}\n"
        f"d(# directories): {counts['dir']}\nd(# catalogs): 0\n" + "".join(lines)
    )


def _content_changed(before: CatalogEntry, after: CatalogEntry) -> bool:
    if before.kind != after.kind:
        return True
    if after.kind == "dir":
        return before.mode != after.mode
    return (before.hash, before.chunks, before.target, before.size, before.mode) != (
        after.hash,
        after.chunks,
        after.target,
        after.size,
        after.mode,
    )


COMMANDS: dict[str, Callable[[Context, list[str]], None]] = {
    "mkfs": cmd_mkfs,
    "transaction": cmd_transaction,
    "publish": cmd_publish,
    "abort": cmd_abort,
    "list": cmd_list,
    "info": cmd_info,
    "mount": cmd_mount,
    "resign": cmd_resign,
    "tag": cmd_tag,
    "check": cmd_check,
    "gc": cmd_gc,
    "rmfs": cmd_rmfs,
    "diff": cmd_diff,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[--root ROOT] <subcommand> ...`` (ROOT also from ``$FAKE_CVMFS_ROOT``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    root_text = os.environ.get("FAKE_CVMFS_ROOT")
    if len(args) >= 2 and args[0] == "--root":
        root_text = args[1]
        args = args[2:]
    elif args and args[0].startswith("--root="):
        root_text = args[0].partition("=")[2]
        args = args[1:]
    if not root_text:
        sys.stderr.write("fake cvmfs_server: --root ROOT (or $FAKE_CVMFS_ROOT) is required\n")
        return 2
    if not args or args[0] not in COMMANDS:
        sys.stderr.write(
            "Usage: cvmfs_server COMMAND [options] <parameters>\n"
            f"Supported by the fake: {', '.join(sorted(COMMANDS))}\n"
        )
        return 2
    root = Path(root_text).absolute()
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="surrogateescape")
    ctx = Context(root, args[0])
    try:
        COMMANDS[args[0]](ctx, args[1:])
    except CommandExit as done:
        return done.code
    except OptionError as exc:
        ctx.err(f"cvmfs_server {args[0]}: {exc}\n")
        return 1
    finally:
        ctx.release_locks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
