"""Tests of the SQLite journal and index."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvmfs_syncd.model import EntryType, Fingerprint, JournalStage, Op, OpKind
from cvmfs_syncd.state import FINAL_STAGES, STAGES, State


def test_journal_stages_survive_reopening(tmp_path: Path) -> None:
    """A batch's stage and ops are committed and read back after reopening the database."""
    state = State(tmp_path)
    fp = Fingerprint(EntryType.FILE, 0o644, 3, 1, 2)
    bid = state.create_batch(
        "r", [Op(OpKind.COPY_FILE, "a/b", "s", "b", fp)], reason="quiet", summary="x"
    )
    state.set_stage(bid, "opening", base_revision=4)
    state.close()
    again = State(tmp_path)
    batch = again.unfinished_batch("r")
    assert batch is not None
    assert (batch.stage, batch.base_revision) == ("opening", 4)
    ops = again.batch_ops(bid)
    assert ops[0][0].fingerprint == fp
    again.set_stage(bid, "done")
    assert again.unfinished_batch("r") is None


def test_index_keeps_non_utf8_names(tmp_path: Path) -> None:
    """Paths that are not UTF-8 round-trip through the index unchanged."""
    state = State(tmp_path)
    name = os.fsdecode(b"caf\xe9/\xff\xfe")
    fp = Fingerprint(EntryType.FILE, 0o644, 1)
    state.apply_published("r", [Op(OpKind.COPY_FILE, name, "s", name, fp)], 7)
    entry = state.published_entry("r", name)
    assert entry is not None
    assert os.fsencode(entry.source_path) == b"caf\xe9/\xff\xfe"
    assert entry.revision == 7


def test_delete_removes_a_subtree_from_the_index(tmp_path: Path) -> None:
    """Deleting a directory removes everything below it, and nothing beside it."""
    state = State(tmp_path)
    fp = Fingerprint(EntryType.FILE)
    paths = ["d", "d/a", "d/b/c", "dd", "e"]
    state.apply_published("r", [Op(OpKind.COPY_FILE, p, "s", p, fp) for p in paths], 1)
    state.apply_published("r", [Op(OpKind.DELETE, "d", "s", "d")], 2)
    assert [e.path for e in state.published_under("r", "")] == ["dd", "e"]
    assert state.count_published("r", "s") == 2


def test_an_ingest_replaces_everything_recorded_under_its_base(tmp_path: Path) -> None:
    """Every path an ingest published is recorded with the tarball as its input; what the
    index had under the base before goes, whoever published it; nothing else is touched."""
    state = State(tmp_path)
    file_fp = Fingerprint(EntryType.FILE, 0o644, 1, 1, 1)
    tarball = Fingerprint(EntryType.FILE, 0o644, 999, 5, 42)
    before = ["sw/foo", "sw/foo/old", "sw/foo/old/x", "sw/foobar", "sw/other"]
    state.apply_published("r", [Op(OpKind.COPY_FILE, p, "s", p, file_fp) for p in before], 1)
    op = Op(OpKind.INGEST, "sw/foo", "s", "foo.tgz", tarball)
    state.apply_ingested("r", op, ["a", "d", "d/b"], 2)
    rows = {e.path: e for e in state.published_under("r", "sw")}
    assert sorted(rows) == ["sw/foo", "sw/foo/a", "sw/foo/d", "sw/foo/d/b", "sw/foobar", "sw/other"]
    for path in ("sw/foo", "sw/foo/a", "sw/foo/d/b"):
        assert (rows[path].source_path, rows[path].fingerprint, rows[path].revision) == (
            "foo.tgz",
            tarball,
            2,
        )
    assert state.count_under("r", "sw/foo", "s") == 4
    assert state.count_under("r", "sw/foo", "other") == 0
    assert state.count_under("r", "sw/foobar", "s") == 1
    with pytest.raises(ValueError, match="fingerprint"):
        state.apply_ingested("r", Op(OpKind.INGEST, "sw/foo", "s", "foo.tgz"), [], 3)


def test_release_is_consumed_once(tmp_path: Path) -> None:
    """An operator's release is taken by exactly one lane step."""
    state = State(tmp_path)
    assert not state.take_release("r")
    state.request_release("r")
    assert state.take_release("r")
    assert not state.take_release("r")


def test_journal_stage_values_are_the_stored_strings() -> None:
    """The enum's values are exactly the strings the journal has always stored, in order
    (``ingesting`` is the stage of a tarball drop's ``ingest``)."""
    assert [s.value for s in JournalStage] == [
        "planned",
        "preparing",
        "opening",
        "open",
        "applied",
        "publishing",
        "ingesting",
        "published",
        "done",
        "aborted",
        "failed",
    ]
    assert STAGES[-1] is JournalStage.DONE
    assert set(FINAL_STAGES) == {"done", "aborted", "failed"}


def test_set_stage_takes_the_enum_or_its_string(tmp_path: Path) -> None:
    """A stage is given as the enum or its stored string; an unknown string is refused."""
    state = State(tmp_path)
    bid = state.create_batch("r", [], reason="quiet", summary="x")
    state.set_stage(bid, JournalStage.PREPARING)
    assert state.batch(bid).stage is JournalStage.PREPARING
    state.set_stage(bid, "open")
    assert state.batch(bid).stage is JournalStage.OPEN
    with pytest.raises(ValueError, match="opened"):
        state.set_stage(bid, "opened")
    assert state.batch(bid).stage is JournalStage.OPEN
