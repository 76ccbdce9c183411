"""The recovery decision table: complete, unambiguous, and what the lane does today."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.pipeline.recovery import (
    EITHER,
    MARKDOWN_HEADER,
    RULES,
    STAGES,
    RecoveryAction,
    combinations,
    decide,
    markdown_rows,
    markdown_table,
    rule_for,
)
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import FINAL_STAGES, State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

A = RecoveryAction
REPO = "test.example.org"

pytestmark = pytest.mark.stratum0(REPO)


def test_every_combination_matches_exactly_one_rule() -> None:
    combos = list(combinations())
    assert len(combos) == len(STAGES) * 4
    for stage, is_open, advanced in combos:
        matching = [rule for rule in RULES if rule.matches(stage, is_open, advanced)]
        assert len(matching) == 1, (stage, is_open, advanced, matching)
        assert decide(stage, is_open, advanced) is matching[0].action


def test_every_rule_is_reachable_and_every_action_used() -> None:
    used = {rule_for(*combo) for combo in combinations()}
    assert used == set(RULES)
    assert {rule.action for rule in RULES} == set(RecoveryAction)
    assert {rule.stage for rule in RULES} == set(STAGES)


def test_stages_are_the_journal_stages_plus_preparing() -> None:
    from cvmfs_syncd.state import STAGES as JOURNAL_STAGES

    # Whether or not the journal lists `preparing` yet, the other stages agree in order.
    def others(stages: tuple[str, ...]) -> list[str]:
        return [s for s in stages if s not in ("preparing", "done")]

    assert others(STAGES) == others(JOURNAL_STAGES)
    assert STAGES.index("planned") < STAGES.index("preparing") < STAGES.index("opening")


@pytest.mark.parametrize("stage", [*FINAL_STAGES, "Planned", ""])
def test_finished_or_unknown_stages_are_refused(stage: str) -> None:
    with pytest.raises(ValueError, match="no recovery"):
        decide(stage, transaction_open=False, revision_advanced=False)


@pytest.mark.parametrize(
    ("stage", "is_open", "advanced", "action"),
    [
        ("planned", True, True, A.MARK_ABORTED),  # an open transaction is not the batch's
        ("preparing", False, False, A.DELETE_PREPARED),
        ("preparing", True, True, A.DELETE_PREPARED),
        ("opening", True, False, A.ABORT_OWN),
        ("open", False, True, A.MARK_ABORTED),
        # `applied` does not consult the revision: no publish of the batch has started.
        ("applied", True, True, A.PUBLISH_THEN_FINISH),
        ("applied", False, True, A.MARK_FAILED),
        ("publishing", True, False, A.PUBLISH_THEN_FINISH),
        ("publishing", False, False, A.MARK_FAILED),
        ("publishing", False, True, A.FINISH),
        ("publishing", True, True, A.ABORT_LEFTOVER_THEN_FINISH),
        # `ingesting`: a transaction left open is the killed ingest's; whether it went
        # live is decided later, by comparing the archive with the live tree.
        ("ingesting", True, True, A.ABORT_OWN),
        ("ingesting", True, False, A.ABORT_OWN),
        ("ingesting", False, True, A.MARK_ABORTED),
        ("ingesting", False, False, A.MARK_ABORTED),
        # `published` finishes whatever the manifest says.
        ("published", False, False, A.FINISH),
        ("published", True, False, A.ABORT_LEFTOVER_THEN_FINISH),
    ],
)
def test_spot_checks(stage: str, is_open: bool, advanced: bool, action: RecoveryAction) -> None:
    assert decide(stage, is_open, advanced) is action


def test_journal_texts_are_those_the_lane_records() -> None:
    assert rule_for("planned", False, False).why == "not started before restart"
    assert rule_for("open", False, False).why == "no transaction after restart"
    assert rule_for("opening", True, False).why == "half-applied batch found after restart"
    assert rule_for("publishing", False, False).why == "transaction gone after restart"
    assert rule_for("ingesting", True, False).why == "ingest interrupted by a restart"
    assert rule_for("ingesting", False, True).why == "ingest interrupted by a restart"
    finishing = (A.FINISH, A.ABORT_LEFTOVER_THEN_FINISH, A.PUBLISH_THEN_FINISH)
    for rule in RULES:
        assert (rule.why == "") == (rule.action in finishing), rule


EXPECTED_TABLE = """\
| journal stage | transaction open | revision advanced | recovery |
| --- | --- | --- | --- |
| `planned` | – | – | mark aborted |
| `preparing` | – | – | delete the batch's objects no published revision references, mark aborted |
| `opening` | yes | – | abort our own transaction (ops may be half-applied) |
| `opening` | no | – | mark aborted |
| `open` | yes | – | abort our own transaction (ops may be half-applied) |
| `open` | no | – | mark aborted |
| `applied` | yes | – | publish the open transaction (every op is in), finish |
| `applied` | no | – | mark failed |
| `publishing` | yes | yes | record published, abort the leftover transaction (it holds nothing new), finish |
| `publishing` | no | yes | record published, finish (index, inbox) |
| `publishing` | yes | no | publish the open transaction (every op is in), finish |
| `publishing` | no | no | mark failed |
| `ingesting` | yes | – | abort our own transaction (ops may be half-applied) |
| `ingesting` | no | – | mark aborted |
| `published` | yes | – | record published, abort the leftover transaction (it holds nothing new), finish |
| `published` | no | – | record published, finish (index, inbox) |
"""  # noqa: E501, RUF001 - whole rows, with the docs' en dash for "either way"


def test_rendered_table() -> None:
    assert markdown_table() == EXPECTED_TABLE
    assert markdown_table().splitlines() == [*MARKDOWN_HEADER, *markdown_rows()]
    assert len(markdown_rows()) == len(RULES)
    assert EITHER == "\N{EN DASH}"


# ------------------------------------------------------------- today's lane as the oracle


# `preparing` is new: the lane does not know it yet.
EXISTING = [combo for combo in combinations() if combo[0] != "preparing"]


@pytest.mark.parametrize(("stage", "is_open", "advanced"), EXISTING)
def test_the_lane_does_what_the_table_says(
    tmp_path: Path,
    stratum0: FakeStratum0,
    staging: Path,
    state: State,
    stage: str,
    is_open: bool,
    advanced: bool,
) -> None:
    """Leave a batch at ``stage`` with the facts given, restart, and observe the lane."""
    path = write_config(
        tmp_path / "cvmfs-syncd.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        staging=staging,
    )
    config = config_mod.load(path)
    base = stratum0.revision(REPO)
    if advanced:
        stratum0.check_run("transaction", REPO)
        stratum0.check_run("publish", REPO)
    if is_open:
        stratum0.check_run("transaction", REPO)
    batch_id = state.create_batch(REPO, [], reason="test", summary="left by a crash")
    if stage != "planned":
        state.set_stage(batch_id, stage, base_revision=base)
    before = stratum0.revision(REPO)

    lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
    lane.recovery.recover()

    after = state.batch(batch_id)
    action = decide(stage, is_open, advanced)
    observed = (after.stage, stratum0.in_transaction(REPO), stratum0.revision(REPO) - before)
    expected = {
        # A transaction open at `planned` is not the batch's and is left alone.
        A.MARK_ABORTED: ("aborted", is_open, 0),
        A.ABORT_OWN: ("aborted", False, 0),
        A.FINISH: ("done", False, 0),
        A.ABORT_LEFTOVER_THEN_FINISH: ("done", False, 0),
        A.PUBLISH_THEN_FINISH: ("done", False, 1),
        A.MARK_FAILED: ("failed", False, 0),
    }[action]
    assert observed == expected, action
    assert after.error == rule_for(stage, is_open, advanced).why


def test_the_architecture_document_shows_this_table() -> None:
    """docs/architecture.md carries the table as generated from the rules."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    begin = "<!-- recovery table: generated from cvmfs_syncd/pipeline/recovery.py -->\n"
    end = "<!-- end of the recovery table -->"
    shown = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert shown == markdown_table()
