"""What a restart does with a batch the previous run left unfinished: a pure decision table.

The lane reads three facts, under the repository lock and after stopping any command the
previous run left behind:

- the batch's journal ``stage``;
- whether a transaction is open (the spool's ``in_transaction.lock`` exists);
- whether the batch went live: a revision past the batch's ``base_revision`` that is this
  batch's (:func:`cvmfs_syncd.pipeline.confirm.live_revision`; behind a gateway other
  publishers move the revision too). Only the ``publishing`` stage consults it: at
  ``published`` the publish is known to have gone through, before ``publishing`` no publish
  of the batch can have run, and at ``ingesting`` the tarball is compared with the live
  tree before it is ingested again, so whether it went live needs no answer here.

:data:`RULES` maps them to one :class:`RecoveryAction`, :func:`decide` looks the action up,
and :func:`markdown_table` renders the rules for ``docs/architecture.md``. Carrying the
action out (commands, journal, object deletion) is the lane's job.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final


class RecoveryAction(enum.Enum):
    """What to do with an unfinished batch. The values are stable names for logs."""

    MARK_ABORTED = "mark_aborted"
    """Nothing reached the repository: journal the batch ``aborted``, drop the objects it
    created."""

    DELETE_PREPARED = "delete_prepared"
    """Objects were being written outside any transaction: delete those journalled for the
    batch that no published revision references, then journal it ``aborted``."""

    ABORT_OWN = "abort_own"
    """The open transaction is the batch's own and may be half-applied: abort it, journal
    the batch ``aborted``, drop the objects it created."""

    FINISH = "finish"
    """The publish went through: journal ``published`` with the current revision, then
    finish (index update and inbox removal are idempotent)."""

    ABORT_LEFTOVER_THEN_FINISH = "abort_leftover_then_finish"
    """The publish went through but the transaction was not closed: journal ``published``,
    abort the leftover transaction (it holds nothing new), finish."""

    PUBLISH_THEN_FINISH = "publish_then_finish"
    """Every op is in the open transaction: publish it, then finish."""

    MARK_FAILED = "mark_failed"
    """Every op was applied but the transaction is gone unpublished: journal the batch
    ``failed``, drop the objects it created."""

    @property
    def description(self) -> str:
        """A short phrase for tables and logs."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: Final[dict[RecoveryAction, str]] = {
    RecoveryAction.MARK_ABORTED: "mark aborted",
    RecoveryAction.DELETE_PREPARED: (
        "delete the batch's objects no published revision references, mark aborted"
    ),
    RecoveryAction.ABORT_OWN: "abort our own transaction (ops may be half-applied)",
    RecoveryAction.FINISH: "record published, finish (index, inbox)",
    RecoveryAction.ABORT_LEFTOVER_THEN_FINISH: (
        "record published, abort the leftover transaction (it holds nothing new), finish"
    ),
    RecoveryAction.PUBLISH_THEN_FINISH: "publish the open transaction (every op is in), finish",
    RecoveryAction.MARK_FAILED: "mark failed",
}

STAGES: Final = (
    "planned",
    "preparing",
    "opening",
    "open",
    "applied",
    "publishing",
    "ingesting",
    "published",
)
"""The journal stages a batch can be left in, in the order a batch passes them."""


@dataclass(frozen=True)
class RecoveryRule:
    """One row of the table: the facts it applies to and the action.

    ``transaction_open`` and ``revision_advanced`` are ``None`` where the rule holds either
    way. ``why`` is the text journalled with the batch when the action ends it (``""`` for
    the actions that finish it).
    """

    stage: str
    transaction_open: bool | None
    revision_advanced: bool | None
    action: RecoveryAction
    why: str = ""

    def matches(self, stage: str, transaction_open: bool, revision_advanced: bool) -> bool:
        """Tell whether this rule applies to the given facts."""
        return (
            self.stage == stage
            and self.transaction_open in (None, transaction_open)
            and self.revision_advanced in (None, revision_advanced)
        )


_A = RecoveryAction

RULES: Final[tuple[RecoveryRule, ...]] = (
    RecoveryRule("planned", None, None, _A.MARK_ABORTED, "not started before restart"),
    # An open transaction at `preparing` is not the batch's (it had not asked for one yet).
    RecoveryRule("preparing", None, None, _A.DELETE_PREPARED, "objects prepared before restart"),
    RecoveryRule("opening", True, None, _A.ABORT_OWN, "half-applied batch found after restart"),
    RecoveryRule("opening", False, None, _A.MARK_ABORTED, "no transaction after restart"),
    RecoveryRule("open", True, None, _A.ABORT_OWN, "half-applied batch found after restart"),
    RecoveryRule("open", False, None, _A.MARK_ABORTED, "no transaction after restart"),
    RecoveryRule("applied", True, None, _A.PUBLISH_THEN_FINISH),
    RecoveryRule("applied", False, None, _A.MARK_FAILED, "transaction gone after restart"),
    RecoveryRule("publishing", True, True, _A.ABORT_LEFTOVER_THEN_FINISH),
    RecoveryRule("publishing", False, True, _A.FINISH),
    RecoveryRule("publishing", True, False, _A.PUBLISH_THEN_FINISH),
    RecoveryRule("publishing", False, False, _A.MARK_FAILED, "transaction gone after restart"),
    # `ingest` opens and publishes its own transaction: one left open is the killed
    # command's. Whether or not it published, the tarball stays pending, and the next run
    # records it without a second revision when the live tree already equals it.
    RecoveryRule("ingesting", True, None, _A.ABORT_OWN, "ingest interrupted by a restart"),
    RecoveryRule("ingesting", False, None, _A.MARK_ABORTED, "ingest interrupted by a restart"),
    RecoveryRule("published", True, None, _A.ABORT_LEFTOVER_THEN_FINISH),
    RecoveryRule("published", False, None, _A.FINISH),
)
"""The decision table: for every stage in :data:`STAGES` and every pair of facts exactly
one rule matches."""


def rule_for(stage: str, transaction_open: bool, revision_advanced: bool) -> RecoveryRule:
    """Return the rule of :data:`RULES` that applies.

    Raises :class:`ValueError` for a stage that is not in :data:`STAGES` (a finished batch
    needs no recovery).
    """
    for rule in RULES:
        if rule.matches(stage, transaction_open, revision_advanced):
            return rule
    raise ValueError(f"no recovery for journal stage {stage!r}")


def decide(stage: str, transaction_open: bool, revision_advanced: bool) -> RecoveryAction:
    """Return what recovery does with a batch left at ``stage``; see :func:`rule_for`."""
    return rule_for(stage, transaction_open, revision_advanced).action


def combinations() -> Iterator[tuple[str, bool, bool]]:
    """Yield every ``(stage, transaction_open, revision_advanced)`` the table must cover."""
    return itertools.product(STAGES, (False, True), (False, True))


MARKDOWN_HEADER: Final = (
    "| journal stage | transaction open | revision advanced | recovery |",
    "| --- | --- | --- | --- |",
)


EITHER: Final = "\N{EN DASH}"
"""What a table cell shows where a rule holds either way (as the docs' tables do)."""


def _cell(value: bool | None) -> str:
    if value is None:
        return EITHER
    return "yes" if value else "no"


def markdown_rows() -> tuple[str, ...]:
    """Return one Markdown table row per rule, in table order (:data:`EITHER` where a
    rule holds either way)."""
    return tuple(
        f"| `{rule.stage}` | {_cell(rule.transaction_open)} | "
        f"{_cell(rule.revision_advanced)} | {rule.action.description} |"
        for rule in RULES
    )


def markdown_table() -> str:
    """Return the whole table, header included, each line ending in a newline."""
    return "".join(line + "\n" for line in (*MARKDOWN_HEADER, *markdown_rows()))
