"""Replay the recordings of the real cvmfs_server 2.12.0 through the outcome mapping."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

import pytest

from cvmfs_syncd.cvmfs.outcomes import (
    Outcome,
    classify,
    explain,
    parse_invalid_graft_path,
    parse_lease_time_remaining,
    parse_open_file_holders,
)
from cvmfs_syncd.cvmfs.tags import parse_tag_listing
from tests.support import needs, reference_dir

REFERENCE_DIR = reference_dir()
TRANSCRIPTS = REFERENCE_DIR / "transcripts"

pytestmark = needs(TRANSCRIPTS.is_dir(), f"reference recordings not found at {TRANSCRIPTS}")

OC = Outcome

# Every recorded cvmfs_server step that did not exit 0, with the outcome it must map to.
# Keyed by (transcript file stem, step).  Steps that exited 0 must all map to OK.
EXPECTED_FAILURES: dict[tuple[str, int], Outcome] = {
    # second transaction, also with -t N; -t 0 killed by the recorder
    ("b_double_transaction", 2): OC.ALREADY_IN_TRANSACTION,
    ("b_double_transaction", 3): OC.ALREADY_IN_TRANSACTION,
    ("b_double_transaction", 4): OC.TIMEOUT,
    # publish / abort without a transaction; abort's prompt answered "n"
    ("c_publish_abort_without_txn", 1): OC.NOT_IN_TRANSACTION,
    ("c_publish_abort_without_txn", 2): OC.NOT_IN_TRANSACTION,
    ("c_publish_abort_without_txn", 3): OC.NOT_IN_TRANSACTION,
    ("c_publish_abort_without_txn", 4): OC.NOT_IN_TRANSACTION,
    ("c_publish_abort_without_txn", 8): OC.PROMPT_DECLINED,
    ("c_publish_abort_without_txn", 9): OC.NOT_IN_TRANSACTION,
    ("c_publish_abort_without_txn", 15): OC.ALREADY_IN_TRANSACTION,
    ("c_publish_abort_without_txn", 17): OC.PROMPT_DECLINED,
    # open writable fd (also with -f); read-only fd prompt
    ("d_publish_with_open_writer", 5): OC.OPEN_WRITERS,
    ("d_publish_with_open_writer", 6): OC.OPEN_WRITERS,
    ("d_publish_with_open_writer", 7): OC.OPEN_WRITERS,
    ("d_publish_with_open_writer", 17): OC.OPEN_READERS,
    ("d_publish_with_open_writer", 20): OC.ALREADY_IN_TRANSACTION,
    ("d_publish_with_open_writer", 22): OC.OPEN_READERS,
    # cwd inside /cvmfs/R
    ("e_publish_cwd_inside", 3): OC.CWD_INSIDE,
    ("e_publish_cwd_inside", 4): OC.CWD_INSIDE,
    ("e_publish_cwd_inside", 5): OC.CWD_INSIDE,
    # path-scoped transactions
    ("f_path_scoped_transaction", 6): OC.PATH_SCOPE_MISSING,
    ("f_path_scoped_transaction", 8): OC.NOT_IN_TRANSACTION,
    ("f_path_scoped_transaction", 9): OC.NOT_IN_TRANSACTION,
    ("f_path_scoped_transaction", 12): OC.NOT_IN_TRANSACTION,
    # tag -r trunk
    ("g_gc", 28): OC.UNDO_TAG_PROTECTED,
    # expired / malformed whitelist, unknown repository
    ("h_resign", 11): OC.WHITELIST_EXPIRED,
    ("h_resign", 24): OC.NO_SUCH_REPOSITORY,
    ("h_resign", 27): OC.WHITELIST_MALFORMED,
    ("h_resign", 32): OC.WHITELIST_EXPIRED,
    ("h_resign", 34): OC.WHITELIST_EXPIRED,
    ("h_resign", 36): OC.WHITELIST_EXPIRED,
    ("h_resign", 38): OC.WHITELIST_EXPIRED,
    ("h_resign", 39): OC.WHITELIST_EXPIRED,
    ("h_resign", 40): OC.WHITELIST_EXPIRED,
    ("h_resign", 55): OC.WHITELIST_EXPIRED,
    ("h_resign", 57): OC.WHITELIST_EXPIRED,
    ("h_resign", 65): OC.WHITELIST_EXPIRED,
    ("h_resign", 67): OC.WHITELIST_EXPIRED,
    ("h_resign", 68): OC.WHITELIST_EXPIRED,
    ("h_resign", 69): OC.WHITELIST_EXPIRED,
    ("h_resign", 70): OC.WHITELIST_EXPIRED,
    ("h_resign", 71): OC.GC_NOT_ENABLED,
    ("h_resign", 73): OC.WHITELIST_EXPIRED,
    # libfaketime artefact (README caveat): nothing specific to name
    ("h_resign", 77): OC.FAILED,
    ("h_resign", 79): OC.NOT_IN_TRANSACTION,
    # check: corrupted, missing object, missing chunk, missing catalog, unknown repository
    ("i_check", 2): OC.CHECK_FAILED,
    ("i_check", 6): OC.CHECK_FAILED,
    ("i_check", 11): OC.CHECK_FAILED,
    ("i_check", 14): OC.CHECK_FAILED,
    ("i_check", 17): OC.CHECK_FAILED,
    ("i_check", 23): OC.NO_SUCH_REPOSITORY,
    # S3 endpoint refusing / hanging / down
    ("j_s3_publish_failure", 5): OC.STORAGE_UNREACHABLE,
    ("j_s3_publish_failure", 36): OC.WHITELIST_UNREACHABLE,
    ("j_s3_publish_failure", 38): OC.WHITELIST_UNREACHABLE,
    ("j_s3_publish_failure", 45): OC.STORAGE_UNREACHABLE,
    # rmfs without -f, stdin at EOF: exit 1 without a word
    ("k_s3_cycle", 36): OC.FAILED,
    # missing mounts; list / mount -a blocked by another repository's hanging S3
    ("l_stale_mount", 4): OC.TIMEOUT,
    ("l_stale_mount", 23): OC.NOT_IN_TRANSACTION,
    ("l_stale_mount", 24): OC.NOT_IN_TRANSACTION,
    ("l_stale_mount", 32): OC.CANNOT_REPAIR,
    ("l_stale_mount", 38): OC.NOT_MOUNTED,
    ("l_stale_mount", 39): OC.NOT_MOUNTED,
    ("l_stale_mount", 42): OC.NOT_IN_TRANSACTION,
    ("l_stale_mount", 44): OC.TIMEOUT,
    # ingest: usage error and the build's tarball defect are plain failures
    ("m_ingest", 2): OC.FAILED,
    ("m_ingest", 3): OC.FAILED,
    ("m_ingest", 6): OC.FAILED,
    ("m_ingest", 8): OC.FAILED,
    ("m_ingest", 16): OC.FAILED,
    ("m_ingest", 19): OC.FAILED,
    ("m_ingest", 21): OC.FAILED,
    ("m_ingest", 23): OC.NOT_IN_TRANSACTION,
    ("m_ingest", 25): OC.ALREADY_IN_TRANSACTION,
    ("m_ingest", 27): OC.FAILED,
    # working ingest: hard link to /etc/passwd, during a transaction, truncated tar, not a tar
    ("m2_ingest", 26): OC.ARCHIVE_HARDLINK_OUTSIDE,
    ("m2_ingest", 49): OC.ALREADY_IN_TRANSACTION,
    ("m2_ingest", 51): OC.ARCHIVE_UNREADABLE,
    ("m2_ingest", 56): OC.ARCHIVE_UNREADABLE,
    # grafts: objects missing in S3 (private ACL), checks, invalid graft files
    ("n2_graft_publish_s3", 19): OC.CHECK_FAILED,
    ("n2_graft_publish_s3", 26): OC.CHECK_FAILED,
    ("n_graft_publish", 78): OC.CHECK_FAILED,
    ("n_graft_publish", 79): OC.CHECK_FAILED,
    ("n_graft_publish", 85): OC.INVALID_GRAFT,
    ("n_graft_publish", 90): OC.INVALID_GRAFT,
    ("n_graft_publish", 94): OC.INVALID_GRAFT,
    ("n_graft_publish", 99): OC.CHECK_FAILED,
    # gc vs. transactions, gc without -z, unknown repository, gc's prompt
    ("o_gc_and_transactions", 2): OC.GC_IN_TRANSACTION,
    ("o_gc_and_transactions", 7): OC.NOT_IN_TRANSACTION,
    ("o_gc_and_transactions", 9): OC.GC_NOT_ENABLED,
    ("o_gc_and_transactions", 10): OC.NO_SUCH_REPOSITORY,
    ("o_gc_and_transactions", 11): OC.PROMPT_DECLINED,
    ("o_gc_and_transactions", 12): OC.PROMPT_DECLINED,
    # gateway publisher: lease path missing (granted, then dropped), second transaction,
    # abort/publish without one; a leading slash is not a repository (a usage error)
    ("p_gateway_basic", 1): OC.PATH_SCOPE_MISSING,
    ("p_gateway_basic", 13): OC.ALREADY_IN_TRANSACTION,
    ("p_gateway_basic", 26): OC.PATH_SCOPE_MISSING,
    ("p_gateway_basic", 27): OC.NOT_IN_TRANSACTION,
    ("p_gateway_basic", 30): OC.FAILED,
    ("p_gateway_basic", 31): OC.NOT_IN_TRANSACTION,
    ("p_gateway_basic", 32): OC.NOT_IN_TRANSACTION,
    ("p_gateway_basic", 33): OC.NOT_IN_TRANSACTION,
    # same, nested, parent and whole-repository leases while another publisher holds sw/a;
    # step 2 remounted first, step 6 retried with -t 8
    ("p_gateway_conflict", 2): OC.LEASE_BUSY,
    ("p_gateway_conflict", 3): OC.LEASE_BUSY,
    ("p_gateway_conflict", 4): OC.LEASE_BUSY,
    ("p_gateway_conflict", 5): OC.LEASE_BUSY,
    ("p_gateway_conflict", 6): OC.LEASE_BUSY,
    # gateway stopped: transaction, then publish and abort -f of an open transaction;
    # after the restart the lease is still held
    ("p_gateway_down", 2): OC.GATEWAY_UNREACHABLE,
    ("p_gateway_down", 4): OC.NOT_IN_TRANSACTION,
    ("p_gateway_down", 5): OC.NOT_IN_TRANSACTION,
    ("p_gateway_down", 10): OC.GATEWAY_UNREACHABLE,
    ("p_gateway_down", 11): OC.GATEWAY_UNREACHABLE,
    ("p_gateway_down", 13): OC.ALREADY_IN_TRANSACTION,
    ("p_gateway_down", 14): OC.LEASE_BUSY,
    ("p_gateway_down", 15): OC.NOT_IN_TRANSACTION,
    # publish on an expired lease (twice), then on a lease another publisher has taken
    ("p_gateway_lease_expiry", 5): OC.LEASE_INVALID,
    ("p_gateway_lease_expiry", 8): OC.LEASE_INVALID,
    ("p_gateway_lease_expiry", 9): OC.ALREADY_IN_TRANSACTION,
    ("p_gateway_lease_expiry", 17): OC.LEASE_INVALID,
    # maintenance on gateway publishers; `tag -i` of the tag that was never made and
    # `snapshot` of a stratum 0 are plain failures (the daemon runs neither)
    ("p_gateway_maintenance", 4): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 5): OC.FAILED,
    ("p_gateway_maintenance", 6): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 9): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 10): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 11): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 12): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 13): OC.NOT_IN_TRANSACTION,
    ("p_gateway_maintenance", 16): OC.FAILED,
    ("p_gateway_maintenance", 19): OC.GATEWAY_UNSUPPORTED,
    ("p_gateway_maintenance", 20): OC.REFLOG_MISSING,
    ("p_gateway_maintenance", 21): OC.GATEWAY_UNSUPPORTED,
}

# Steps where the recorder ran cvmfs_server inside `sh -c` and echoed its exit code:
# (subcommand, label printed before the exit code, expected outcome).
EXPECTED_EMBEDDED: dict[tuple[str, int], tuple[str, str, Outcome]] = {
    ("j_s3_publish_failure", 16): ("publish", "publish exit code", OC.STORAGE_UNREACHABLE),
    ("j_s3_publish_failure", 28): ("publish", "publish exit code", OC.STORAGE_UNREACHABLE),
    ("j_s3_publish_failure", 51): ("publish", "publish exit code", OC.STORAGE_UNREACHABLE),
    ("m_ingest", 10): ("ingest", "exit code", OC.FAILED),
    ("o_gc_and_transactions", 5): ("gc", "gc exit code", OC.OK),
    ("o_gc_and_transactions", 6): (
        "transaction",
        "transaction exit code",
        OC.ALREADY_IN_TRANSACTION,
    ),
    ("o_gc_and_transactions", 8): ("gc", "gc exit code", OC.GC_IN_TRANSACTION),
}


@dataclass(frozen=True)
class Step:
    """One recorded step that ran cvmfs_server directly."""

    transcript: str
    step: int
    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str
    stderr: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.transcript, self.step)

    @property
    def subcommand(self) -> str:
        return self.argv[1]


@cache
def _records() -> tuple[tuple[str, dict[str, object]], ...]:
    out: list[tuple[str, dict[str, object]]] = []
    if not TRANSCRIPTS.is_dir():
        return ()
    for path in sorted(TRANSCRIPTS.glob("*.jsonl")):
        with path.open(encoding="utf-8") as stream:
            out.extend((path.stem, json.loads(line)) for line in stream if line.strip())
    return tuple(out)


def _server_argv(argv: list[str]) -> tuple[str, ...] | None:
    """Return the cvmfs_server argv of a step (unwrapping `faketime -f OFFSET`), else None."""
    if argv[:1] == ["faketime"]:
        argv = argv[3:]
    if argv[:1] == ["cvmfs_server"] and len(argv) > 1:
        return tuple(argv)
    return None


@cache
def server_steps() -> tuple[Step, ...]:
    steps: list[Step] = []
    for stem, record in _records():
        raw_argv = record["argv"]
        assert isinstance(raw_argv, list)
        argv = _server_argv([str(part) for part in raw_argv])
        if argv is None:
            continue
        code = record["exit_code"]
        steps.append(
            Step(
                transcript=stem,
                step=int(str(record["step"])),
                argv=argv,
                exit_code=None if code == "timeout" else int(str(code)),
                stdout=str(record["stdout"]),
                stderr=str(record["stderr"]),
            )
        )
    return tuple(steps)


def record(transcript: str, step: int) -> dict[str, object]:
    for stem, rec in _records():
        if stem == transcript and rec["step"] == step:
            return rec
    raise KeyError((transcript, step))


def _ids(steps: tuple[Step, ...]) -> list[str]:
    return [f"{s.transcript}:{s.step}:{s.subcommand}" for s in steps]


def test_recordings_contain_many_server_steps() -> None:
    """The replay really covers the recordings: hundreds of cvmfs_server steps in every file."""
    steps = server_steps()
    assert len(steps) > 300
    assert {s.transcript for s in steps} == {p.stem for p in TRANSCRIPTS.glob("*.jsonl")}


def test_expectation_table_covers_exactly_the_failing_steps() -> None:
    """Every non-zero (or killed) cvmfs_server step has an expected outcome, and no other does."""
    failing = {s.key for s in server_steps() if s.exit_code != 0}
    assert failing == set(EXPECTED_FAILURES)


@pytest.mark.parametrize("step", server_steps(), ids=_ids(server_steps()))
def test_recorded_step_maps_to_expected_outcome(step: Step) -> None:
    """Each recorded cvmfs_server step classifies as the table says (OK for every exit 0)."""
    expected = EXPECTED_FAILURES.get(step.key, OC.OK)
    assert classify(step.subcommand, step.exit_code, step.stdout, step.stderr) is expected


@pytest.mark.parametrize(
    "key", sorted(EXPECTED_EMBEDDED), ids=[f"{t}:{s}" for t, s in sorted(EXPECTED_EMBEDDED)]
)
def test_shell_wrapped_step_maps_to_expected_outcome(key: tuple[str, int]) -> None:
    """A cvmfs_server call the recorder ran inside a shell classifies by its echoed exit code."""
    subcommand, label, expected = EXPECTED_EMBEDDED[key]
    rec = record(*key)
    stdout, stderr = str(rec["stdout"]), str(rec["stderr"])
    match = re.search(rf"^{re.escape(label)}: (\d+)$", stdout, re.MULTILINE)
    assert match is not None
    assert classify(subcommand, int(match[1]), stdout, stderr) is expected


def test_every_specific_outcome_has_recorded_evidence() -> None:
    """All outcomes except the generic FAILED are produced by at least one recording."""
    seen = set(EXPECTED_FAILURES.values()) | {OC.OK}
    assert seen >= set(Outcome) - {OC.FAILED}


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (("h_resign", 38), "(unexpected termination) cannot load whitelist [expired whitelist]"),
        (("l_stale_mount", 32), "ref.local is in a transaction but /cvmfs/ref.local is not"),
        (("j_s3_publish_failure", 5), "Repository unavailable under http://127.0.0.1:9001/"),
        (("h_resign", 77), "(unexpected termination) cannot create directory /var/spool/cvmfs/"),
        (("m_ingest", 3), "Impossible to open the archive: No formats registered"),
        (("c_publish_abort_without_txn", 1), "Repository ref.local is not in a transaction"),
        (("p_gateway_conflict", 2), "CernVM-FS transaction error: lease path busy"),
        (("p_gateway_down", 2), "Make lease acquire request failed: 7"),
        (("p_gateway_down", 10), "SessionContext::DoUpload - curl_easy_perform failed: 7"),
        (("p_gateway_down", 11), "Make lease drop request failed: 7"),
        (("p_gateway_lease_expiry", 5), 'SessionContext::DoUpload - error reply: {"reason":"inv'),
        (("p_gateway_maintenance", 9), "Failed to configure gateway uploader. Missing session"),
        (("p_gateway_maintenance", 12), "[ERROR] Session token file has to be provided when"),
        (("m2_ingest", 26), "catalog for file 'hostile/hardlink_out/etc/passwd' cannot be"),
        (("m2_ingest", 51), "failed to read data from the tar entry: /trunc/dir/m/f025.bin"),
        (("m2_ingest", 56), "Impossible to open the archive: Unrecognized archive format"),
    ],
)
def test_reason_is_the_telling_line(key: tuple[str, int], reason: str) -> None:
    """The explanation of a recorded failure is its informative line, not stack-trace noise."""
    step = next(s for s in server_steps() if s.key == key)
    outcome = classify(step.subcommand, step.exit_code, step.stdout, step.stderr)
    assert explain(outcome, step.stdout, step.stderr).startswith(reason)


@pytest.mark.parametrize("step", [17, 22, 23])
def test_open_file_holders_from_recorded_lsof_report(step: int) -> None:
    """The read-only fd warning (prompting and -f form) yields the reader, not the FUSE client."""
    stdout = str(record("d_publish_with_open_writer", step)["stdout"])
    assert parse_open_file_holders(stdout) == ("sleep[32319] /cvmfs/ref.local/hello.txt",)


def test_no_open_file_holders_without_report() -> None:
    """A publish without an lsof report has no holders."""
    assert parse_open_file_holders(str(record("transaction", 5)["stdout"])) == ()


@pytest.mark.parametrize(
    ("step", "path"),
    [(85, "g/bad_size.bin"), (90, "g/bad_nochecksum.bin"), (94, "g/bad_offsets.bin")],
)
def test_invalid_graft_path_from_recorded_panic(step: int, path: str) -> None:
    """The PANIC of an invalid graft names the placeholder the daemon must set aside."""
    assert parse_invalid_graft_path(str(record("n_graft_publish", step)["stderr"])) == path


@pytest.mark.parametrize(
    ("key", "seconds"),
    [
        (("p_gateway_conflict", 2), 29.812980102),
        (("p_gateway_conflict", 5), 29.6731049),
        # `transaction -t 8` printed one note per attempt; the last one counts
        (("p_gateway_conflict", 6), 17.621976252),
        (("p_gateway_down", 14), 23.659323719),
    ],
)
def test_lease_time_remaining_from_recorded_busy_lease(
    key: tuple[str, int], seconds: float
) -> None:
    """A refused lease reports how long the other publisher's lease still runs."""
    assert parse_lease_time_remaining(str(record(*key)["stdout"])) == pytest.approx(seconds)


def test_no_lease_time_remaining_when_the_lease_was_granted() -> None:
    """A granted lease (`Gateway reply: ok`) or a plain failure carries no time remaining."""
    assert parse_lease_time_remaining(str(record("p_gateway_basic", 6)["stdout"])) is None
    assert parse_lease_time_remaining(str(record("p_gateway_down", 2)["stdout"])) is None


def test_tag_listing_parses_recorded_machine_readable_output() -> None:
    """`tag -lx` lines become Tags with revision, time, hash, branch and description."""
    tags = parse_tag_listing(str(record("g_gc", 14)["stdout"]))
    assert [t.name for t in tags] == [
        "generic-2026-11-29T02:14:14Z",
        "trunk",
        "mytag",
        "generic_1-2026-11-29T02:14:13Z",
        "trunk-previous",
        "generic-2026-11-29T02:14:13Z",
        "generic-2026-11-29T02:11:05Z",
    ]
    first, trunk, mytag = tags[0], tags[1], tags[2]
    assert first.revision == 4
    assert first.root_hash == "d93dc34bc8606198e5a318ebee1ea41b5787c7f9"
    assert first.size_bytes == 57344
    assert first.timestamp == datetime(2026, 11, 29, 2, 14, 14, tzinfo=UTC)
    assert first.branch == ""
    assert first.description == "publish 3"
    assert first.is_auto_tag and not first.is_undo_tag
    assert trunk.is_undo_tag and not trunk.is_auto_tag
    assert mytag.description == "my named tag" and not mytag.is_auto_tag
    assert tags[3].is_auto_tag
    assert tags[-1].description == ""


def test_every_recorded_tag_listing_parses() -> None:
    """Every successful recorded `tag -lx` parses, and each one lists the trunk tag."""
    listings = [s for s in server_steps() if s.argv[1:3] == ("tag", "-lx") and s.exit_code == 0]
    assert listings
    for step in listings:
        names = {t.name for t in parse_tag_listing(step.stdout)}
        assert "trunk" in names
