"""``publish`` on a gateway publisher: the sync, the commit the gateway's receiver makes of
it, and what the publisher's mount shows afterwards (gateway.md 3, 4, 9-11, 14, 17).

The fake's publisher does the receiver's work itself, under a flock of the storage host
(``fake/repos/R/commit.lock``) so that commits are serialised as the gateway serialises
them: it submits the commit (``POST /api/v1/leases/<token>``: the gateway checks and ends
the lease), then puts its changes below the leased path onto the newest published
revision. Changes outside the leased path are dropped; a revision is made even when
nothing changed; the tag is the receiver's ``generic-<time with milliseconds>Z``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.fake_cvmfs.server.catalog import (
    Catalog,
    CatalogEntry,
    revision_record,
    store_catalog,
    store_history,
    tag_row,
)
from tests.fake_cvmfs.server.clock import parse_timespan, utc
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.faults import command_costs
from tests.fake_cvmfs.server.files import flocked, read_json
from tests.fake_cvmfs.server.gateway import (
    call,
    forget_session_token,
    read_session_token,
    show_revision,
)
from tests.fake_cvmfs.server.recorded import PUBLISH_STEPS_BEFORE_UPLOAD, UPLOAD_ERROR_REPLY
from tests.fake_cvmfs.server.repository import Repo, record_refs
from tests.fake_cvmfs.server.storage import Manifest
from tests.fake_cvmfs.server.sync import Ingester, PublishJob, plan_catalog, swissknife_command
from tests.fake_cvmfs.server.union import load_snapshot, scan_tree


def inside(path: str, scope: str) -> bool:
    """Whether ``path`` lies in a lease on ``scope`` (``""``: the whole repository)."""
    return not scope or path == scope or path.startswith(scope + "/")


def merge_lease(
    head: Catalog, ours: dict[str, CatalogEntry], scope: str, revision: int, timestamp: int
) -> Catalog:
    """The receiver's new revision: ``head`` with everything below ``scope`` taken from the
    publisher's tree ``ours``; the publisher's changes elsewhere are dropped (basic 20-22)."""
    entries = {path: entry for path, entry in head.entries.items() if not inside(path, scope)}
    entries.update((path, entry) for path, entry in ours.items() if inside(path, scope))
    parent = scope.rpartition("/")[0]
    while parent:
        if parent not in entries and parent in ours:
            entries[parent] = ours[parent]
        parent = parent.rpartition("/")[0]
    entries.setdefault("/", ours["/"])
    return Catalog(head.repository, revision, timestamp, entries)


def publish_through_gateway(ctx: Context, job: PublishJob, named_tag: str | None) -> None:
    """The part of ``publish`` after its checks, for a gateway publisher.

    Output as recorded (basic 5); a refused or failed commit prints the recorded failure
    and exits 1 with the transaction open (expiry 5, down 10). ``named_tag`` is ``-a``'s.
    """
    repo = job.repo
    ctx.fault("before_sync")
    ctx.out(PUBLISH_STEPS_BEFORE_UPLOAD[0])
    base_hash = repo.mounted_root_hash()
    base = repo.catalog(base_hash)
    current = scan_tree(repo.union)
    entries, todo = plan_catalog(ctx, job, base, load_snapshot(repo), current)
    job.copied = len(todo)
    ctx.out(PUBLISH_STEPS_BEFORE_UPLOAD[1])
    ingester = Ingester(job)
    for path, info in todo:
        try:
            entries[path] = ingester.ingest(f"{repo.union}{path}", info)
        except OSError as exc:
            ctx.err(f"Failed to read {repo.union}{path}: {exc.strerror}\nSynchronization failed\n")
            raise CommandExit(1) from None
    ctx.fault("after_upload")
    ctx.out("Committing file catalogs...\nSwissknife Sync: Wait for all uploads to finish\n")
    scope = str(read_json(repo.state_dir / "transaction.json", {}).get("scope", ""))
    receiver = repo.receiver()
    with flocked(receiver.state_dir / "commit.lock"):
        _submit(ctx, job, base_hash, named_tag)
        head = receiver.manifest()
        merged = merge_lease(
            receiver.catalog(head.root_hash), entries, scope, head.revision + 1, int(job.now)
        )
        root_hash = _commit(receiver, job, head, merged, named_tag)
    ctx.out(
        "Swissknife Sync: Exporting repository manifest\n"
        f"Statistics stored at: {repo.spool}/stats.db\n"
    )
    if not (repo.spool / "stats.db").exists():
        (repo.spool / "stats.db").write_bytes(b"SQLite format 3\x00 fake statistics\n")
    ctx.out("Changes submitted to repository gateway\n")
    if head.root_hash == base_hash:
        fresh = {
            path: info
            for path, info in current.items()
            if inside(path, scope) and path in merged.entries and not merged.entries[path].graft
        }
        show_revision(repo, base, merged, fresh)
        repo.set_mounted(merged.revision, root_hash)
    else:
        # published on a stale base: the gateway rebased, the mount stays where it was
        # until the next transaction (conflict 19-23)
        show_revision(repo, base, base)
    ctx.pad_until(job.cost(command_costs(ctx.root, "publish"), locked=True))
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    forget_session_token(repo)
    repo.set_mount_state(union_rw=False)
    ctx.fault("end")


def _submit(ctx: Context, job: PublishJob, base_hash: str, named_tag: str | None) -> None:
    """Submit the commit to the gateway; print the recorded failure and exit 1 when it is
    unreachable (down 10) or no longer knows the lease (expiry 5, 8, 17)."""
    repo = job.repo
    token = read_session_token(repo)
    if token is None:
        reply_text = '{"reason":"invalid lease","status":"error"}'
        curl_error = None
    else:
        body = json.dumps(
            {
                "old_root_hash": base_hash,
                "tag_name": named_tag or "",
                "tag_description": job.message or "",
            }
        ).encode()
        reply = call(repo, "POST", f"/leases/{token}", body, sign=body)
        if reply.curl_error is None and reply.status == "ok":
            return
        reply_text, curl_error = reply.raw.strip(), reply.curl_error
    command = swissknife_command(repo, base_hash, job.tag_name, job.message).replace(
        " -f overlayfs", f" -H {repo.key('gw')} -P {repo.spool}/session_token -f overlayfs", 1
    )
    if curl_error is not None:
        failure = (
            f"SessionContext::DoUpload - curl_easy_perform failed: {curl_error}\n"
            "Killed\nSynchronization failed\n"
        )
    else:
        failure = UPLOAD_ERROR_REPLY.format(reply=reply_text)
    ctx.err(f"{failure}\nExecuted Command:\n{command}\n")
    raise CommandExit(1)


def _commit(
    receiver: Repo, job: PublishJob, head: Manifest, merged: Catalog, named_tag: str | None
) -> str:
    """Store the new revision with its tags and manifest; return its root hash."""
    root_hash, size = store_catalog(receiver, merged)
    tags = _receiver_tags(receiver, job, revision_record(merged, root_hash, size), named_tag)
    history = store_history(receiver, tags)
    reflog = record_refs(receiver, [(root_hash + "C", 0), (history, 2)], job.now)
    receiver.add_revision(merged, root_hash, size)
    receiver.write_manifest(
        Manifest(
            root_hash,
            size,
            merged.revision,
            head.garbage_collectable,
            receiver.name,
            head.certificate,
            history,
            int(job.now),
            head.meta_info,
            reflog,
        )
    )
    return root_hash


AUTO_TAG_RE = re.compile(r"^generic(_\d+)?-")


def _receiver_tags(
    receiver: Repo, job: PublishJob, record: dict[str, Any], named_tag: str | None
) -> list[dict[str, Any]]:
    """The tag database after a commit: the named tag, or the receiver's own automatic
    ``generic-<UTC time with milliseconds>Z`` (basic 18), and the undo tags moved on."""
    tags = receiver.tags()
    name = named_tag
    if not name and receiver.flag("CVMFS_AUTO_TAG", default=True):
        stamp = utc("%Y-%m-%dT%H:%M:%S", job.now) + f".{int(job.now * 1000) % 1000:03d}Z"
        existing = {str(t.get("name")) for t in tags}
        name = f"generic-{stamp}"
        counter = 0
        while name in existing:
            counter += 1
            name = f"generic_{counter}-{stamp}"
    if name:
        tags.append(tag_row(name, record, job.message or ""))
    old_trunk = next((t for t in tags if t.get("name") == "trunk"), None)
    tags = [t for t in tags if t.get("name") not in ("trunk", "trunk-previous")]
    if old_trunk is not None:
        tags.append(dict(old_trunk, name="trunk-previous", description="default undo target"))
    tags.append(tag_row("trunk", record, "current HEAD"))
    span = parse_timespan(receiver.conf.get("CVMFS_AUTO_TAG_TIMESPAN", ""))
    if span is not None:
        tags = [
            t
            for t in tags
            if not (
                AUTO_TAG_RE.match(str(t.get("name", "")))
                and int(t.get("timestamp", 0)) < job.now - span
                and t.get("name") != name
            )
        ]
    return tags
