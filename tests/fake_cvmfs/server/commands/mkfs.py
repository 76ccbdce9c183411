"""``cvmfs_server mkfs``: create a repository (configuration, keys, storage, revisions 0 and 1)."""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import Any

from tests.fake_cvmfs.server.catalog import (
    Catalog,
    CatalogEntry,
    revision_record,
    store_catalog,
    store_history,
    tag_row,
)
from tests.fake_cvmfs.server.clock import utc
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.garbage import auto_gc_enabled, write_gc_status
from tests.fake_cvmfs.server.recorded import (
    CREATOR_VERSION,
    MASTER_REPLICA_TEXT,
    META_INFO_TEXT,
    MKFS_TAIL,
    SPOOL_DIRS,
)
from tests.fake_cvmfs.server.repository import REPO_NAME_RE, Repo, record_refs, write_whitelist
from tests.fake_cvmfs.server.storage import ALGORITHMS, Manifest
from tests.fake_cvmfs.server.union import save_snapshot, scan_tree, sync_union


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
    record = revision_record(first, hash1, size1)
    certificate = repo.store_object(zlib.compress(repo.key("crt").read_bytes()), "X")
    meta = repo.store_object(zlib.compress(META_INFO_TEXT.encode()), "M")
    tags: list[dict[str, Any]] = []
    if repo.flag("CVMFS_AUTO_TAG", default=True):
        tags.append(tag_row(utc("generic-%Y-%m-%dT%H:%M:%SZ", now), record, ""))
    tags.append(tag_row("trunk", record, "current HEAD"))
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
