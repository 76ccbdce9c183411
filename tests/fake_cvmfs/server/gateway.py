"""A publisher's side of the repository gateway (p_gateway_*, gateway.md).

A gateway publisher has ``CVMFS_UPSTREAM_STORAGE=gw,<tmp>,<API URL>`` in its server.conf
and the recorded ``TEST_CVMFS_RECEIVER_UPSTREAM_STORAGE`` naming the receiver's storage
(``Repo.storage`` follows it: every publisher reads the one shared storage). Here: the
lease calls over HTTP (``take_lease``, ``release_lease``) with the recorded message for
each reply, the spool's ``session_token``, the mounted revision that lags behind the
published one until the publisher remounts (``remount_if_stale``, ``show_revision``), and
the set-up of such a repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.fake_cvmfs.server.catalog import Catalog
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.files import write_json
from tests.fake_cvmfs.server.leases import lease_name, signature
from tests.fake_cvmfs.server.recorded import (
    FORCED_LEASE_DROP,
    FUSE_CHATTER,
    GATEWAY_REPLY_OK,
    SPOOL_DIRS,
    TRACE_LEASE_ACQUIRE,
)
from tests.fake_cvmfs.server.repository import Repo
from tests.fake_cvmfs.server.union import (
    StatInfo,
    load_snapshot,
    save_snapshot,
    scan_tree,
    sync_union,
)

SESSION_TOKEN = "session_token"  # noqa: S105 (the spool file's name)
HTTP_TIMEOUT = 10.0
CURL_COULDNT_CONNECT = 7
CURL_TIMEOUT = 28


def host_name(repo: Repo) -> str:
    """The publisher's host name: ``ROOT/etc/hostname`` when present (each fake publisher
    can have its own), else this machine's."""
    try:
        name = (repo.root / "etc" / "hostname").read_text().strip()
    except OSError:
        name = ""
    return name or os.uname().nodename


class GatewayReply:
    """What one API call came back with: the JSON reply, or a curl error number."""

    def __init__(self, curl_error: int | None, raw: str = "") -> None:
        self.curl_error = curl_error
        self.raw = raw
        try:
            document = json.loads(raw) if raw else {}
        except ValueError:
            document = {}
        self.data: dict[str, Any] = document if isinstance(document, dict) else {}

    @property
    def status(self) -> str:
        """The reply's ``status`` ("ok", "path_busy", "error"; "" without a reply)."""
        return str(self.data.get("status", ""))

    @property
    def reason(self) -> str:
        """The reply's ``reason`` (errors)."""
        return str(self.data.get("reason", self.raw.strip()))


def call(
    repo: Repo, method: str, path: str, body: bytes = b"", *, sign: bytes | None = None
) -> GatewayReply:
    """One request to the gateway's API (URL from ``CVMFS_UPSTREAM_STORAGE``); ``sign``:
    the bytes to sign with the key of ``/etc/cvmfs/keys/<repo>.gw``."""
    # imported here: every fake command would pay for http.client's import otherwise
    import http.client

    url = urlsplit(repo.conf.get("CVMFS_UPSTREAM_STORAGE", "").split(",", 2)[-1])
    headers = {"Content-Type": "application/json"}
    if sign is not None:
        try:
            words = repo.key("gw").read_text().split()
        except OSError:
            words = []  # unsigned: the gateway answers invalid_hmac
        key_id, secret = (words[1], words[2]) if len(words) == 3 else ("", "")
        headers["Authorization"] = f"{key_id} {signature(secret, sign)}"
    connection = http.client.HTTPConnection(
        url.hostname or "localhost", url.port or 80, timeout=HTTP_TIMEOUT
    )
    try:
        connection.request(method, url.path.rstrip("/") + path, body=body or None, headers=headers)
        raw = connection.getresponse().read().decode(errors="replace")
    except TimeoutError:
        return GatewayReply(CURL_TIMEOUT)
    except (OSError, http.client.HTTPException):
        return GatewayReply(CURL_COULDNT_CONNECT)
    finally:
        connection.close()
    return GatewayReply(None, raw)


# -- the session token -------------------------------------------------------------------------


def read_session_token(repo: Repo) -> str | None:
    """The token of the lease this publisher holds (the spool's ``session_token``)."""
    try:
        return (repo.spool / SESSION_TOKEN).read_text().strip() or None
    except OSError:
        return None


def write_session_token(repo: Repo, token: str) -> None:
    """Keep the lease's token in the spool while the transaction is open."""
    path = repo.spool / SESSION_TOKEN
    path.write_text(token)
    path.chmod(0o600)


def forget_session_token(repo: Repo) -> None:
    """Remove the spool's ``session_token`` (the lease is gone)."""
    (repo.spool / SESSION_TOKEN).unlink(missing_ok=True)


# -- leases --------------------------------------------------------------------------------------


def take_lease(ctx: Context, repo: Repo, scope: str) -> str | int:
    """The gateway's part of ``transaction R[/path]``: remount when not on the newest
    revision (even when the lease is then refused, conflict 2), then ask for the lease.

    Returns the session token, or the exit code after printing the reason: 1 gateway
    unreachable (down 2), 16 path busy (only ``Path busy. Time remaining = …`` is printed
    here; ``transaction`` adds the final error line, or retries with ``-t``).
    """
    remount_if_stale(ctx, repo, style="transaction")
    body = json.dumps(
        {"api_version": "3", "path": lease_name(repo.name, scope), "hostname": host_name(repo)}
    ).encode()
    reply = call(repo, "POST", "/leases", body, sign=body)
    if reply.curl_error is not None:
        ctx.err(
            f"Make lease acquire request failed: {reply.curl_error}. Reply: \n"
            "(unexpected termination) cannot acquire lease\n" + TRACE_LEASE_ACQUIRE
        )
        return 1
    if reply.status == "ok":
        ctx.out(GATEWAY_REPLY_OK)
        return str(reply.data.get("session_token", ""))
    if reply.status == "path_busy":
        ctx.out(f"Path busy. Time remaining = {reply.data.get('time_remaining')}\n")
        return 16
    ctx.out(f"Error from gateway: '{reply.reason}'\n")
    ctx.err("(unexpected termination) cannot acquire lease\n" + TRACE_LEASE_ACQUIRE)
    return 1


def drop_lease(ctx: Context, token: str, repo: Repo) -> GatewayReply:
    """Give a lease back (``DELETE /leases/<token>``), printing ``Gateway reply: ok``."""
    reply = call(repo, "DELETE", f"/leases/{token}", sign=token.encode())
    if reply.status == "ok":
        ctx.out(GATEWAY_REPLY_OK)
    return reply


def release_lease(ctx: Context, repo: Repo, *, force: bool) -> None:
    """``abort``'s lease drop: an unreachable gateway ends it with exit 5, lock and mount
    kept, even with ``-f`` (down 11); a lease the gateway no longer knows is forgotten with
    ``-f`` (expiry 19; without ``-f`` the fake stops with exit 5, a choice)."""
    token = read_session_token(repo)
    if token is None:
        return
    reply = drop_lease(ctx, token, repo)
    if reply.curl_error is not None:
        ctx.err(
            f"Make lease drop request failed: {reply.curl_error}. Reply: ''\ncannot drop lease\n"
        )
        raise CommandExit(5)
    if reply.status != "ok":
        ctx.out(f"Error from gateway: '{reply.reason}'\n")
        if not force:
            ctx.err("cannot drop lease\n")
            raise CommandExit(5)
        ctx.err(FORCED_LEASE_DROP)
    forget_session_token(repo)


# -- the publisher's mount ------------------------------------------------------------------------


def show_revision(
    repo: Repo, old: Catalog, new: Catalog, fresh: dict[str, StatInfo] | None = None
) -> None:
    """Make the union directory show ``new`` instead of ``old``: what is unchanged since the
    last snapshot and the same in both stays, ``fresh`` paths (just published from this
    union) stay, everything else is rewritten from the storage."""
    keep = {
        path: info
        for path, info in load_snapshot(repo).items()
        if old.entries.get(path) == new.entries.get(path)
    }
    keep.update(fresh or {})
    sync_union(repo, new, keep)
    save_snapshot(repo, scan_tree(repo.union))


def remount_if_stale(ctx: Context, repo: Repo, *, style: str) -> None:
    """Remount a gateway publisher that is not on the newest published revision.

    ``style`` "transaction" (cvmfs_publish's wording, FUSE chatter on stdout; conflict 2,
    13) or "check" (the shell's ``Note:`` lines; maintenance 18). Nothing happens during
    an open transaction.
    """
    mounted = repo.mounted()
    if mounted is None or repo.in_transaction():
        return
    try:
        manifest = repo.manifest()
    except (OSError, ValueError, KeyError):
        return  # the command itself reports the storage's problem
    if manifest.root_hash == mounted[1]:
        return
    rdonly = repo.spool / "rdonly"
    if style == "transaction":
        lines = [f"Trying to unmount {repo.union}", f"Trying to unmount {rdonly}"]
        lines += [f"Trying to mount {rdonly}", f"Trying to mount {repo.union}"]
    else:
        lines = [f"Note: Trying to umount {repo.union}", f"Note: Trying to umount {rdonly}"]
        lines += [f"Note: Trying to mount {rdonly}", f"Note: Trying to mount {repo.union}"]
    ctx.err(
        f"{repo.name} is not based on the newest published revision\n"
        + "".join(f"{line}... success\n" for line in lines)
    )
    if style == "transaction":
        ctx.out(FUSE_CHATTER.format(rdonly=rdonly))
    show_revision(repo, repo.catalog(mounted[1]), repo.catalog(manifest.root_hash))
    repo.set_mounted(manifest.revision, manifest.root_hash)


# -- set-up ---------------------------------------------------------------------------------------


def make_gateway_repository(repo: Repo, url: str, key_id: str, secret: str) -> None:
    """Turn a repository made by ``mkfs`` into a gateway repository published from this
    host, by upstream's single-host recipe (gateway.md): the gw upstream and the receiver's
    storage appended to server.conf, no root hash in client.local, the gateway key."""
    storage = repo.storage
    with repo.server_conf.open("a") as conf:
        conf.write(
            f"CVMFS_UPSTREAM_STORAGE=gw,{storage}/data/txn,{url}\n"
            f"TEST_CVMFS_RECEIVER_UPSTREAM_STORAGE=local,{storage}/data/txn,{storage}\n"
        )
    repo.reload_conf()
    (repo.spool / "client.local").write_text("")
    key = repo.key("gw")
    key.write_text(f"plain_text {key_id} {secret}\n")
    key.chmod(0o400)
    manifest = repo.manifest()
    repo.set_mounted(manifest.revision, manifest.root_hash)


def set_up_publisher(source: Repo, root: Path, hostname: str | None = None) -> Repo:
    """Set up another publisher host of ``source``'s gateway repository below ``root``:
    the configuration and keys copied (union and spool below ``root``), a spool as a host
    that has not published yet has it (no ``stats.db``, no ``reflog.chksum``; conflict 2)
    and the newest revision mounted."""
    target = Repo(root, source.name)
    target.repo_conf_dir.mkdir(parents=True, exist_ok=True)
    own = {
        "CVMFS_UNION_DIR": root / "cvmfs" / source.name,
        "CVMFS_SPOOL_DIR": root / "var" / "spool" / "cvmfs" / source.name,
    }
    server_lines = [
        f"{key}={own[key]}" if key in own else line
        for line in source.server_conf.read_text().splitlines()
        for key in [line.partition("=")[0]]
    ]
    target.server_conf.write_text("\n".join(server_lines) + "\n")
    client_lines = [
        line if line.startswith("CVMFS_SERVER_URL=") else line.replace(str(source.root), str(root))
        for line in (source.repo_conf_dir / "client.conf").read_text().splitlines()
    ]
    (target.repo_conf_dir / "client.conf").write_text("\n".join(client_lines) + "\n")
    import shutil

    target.key("pub").parent.mkdir(parents=True, exist_ok=True)
    for key_file in sorted(source.key("pub").parent.glob(f"{source.name}.*")):
        shutil.copy2(key_file, target.key("pub").parent / key_file.name)
    if hostname:
        (root / "etc" / "hostname").write_text(hostname + "\n")
    for sub in SPOOL_DIRS:
        (target.spool / sub).mkdir(parents=True, exist_ok=True)
    (target.spool / "ofs_workdir" / "work").chmod(0o000)
    (target.spool / "ovl_work").chmod(0o700)
    (target.spool / "client.local").write_text("")
    target.state_dir.mkdir(parents=True, exist_ok=True)
    write_json(target.state_dir / "gateway.json", {"receiver_root": str(source.receiver().root)})
    target.union.mkdir(parents=True, exist_ok=True)
    target.set_mount_state(union_mounted=True, union_rw=False, rdonly_mounted=True)
    manifest = target.manifest()
    sync_union(target, target.catalog(manifest.root_hash), {})
    save_snapshot(target, scan_tree(target.union))
    target.set_mounted(manifest.revision, manifest.root_hash)
    return target
