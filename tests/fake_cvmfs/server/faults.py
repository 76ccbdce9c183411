"""Injected faults and calibrated costs: ``ROOT/fake-faults.json`` and ``ROOT/fake-costs.json``.

Both files are written here on behalf of the test handle (``FakeStratum0.inject_fault``,
``clear_faults``, ``faults``, ``set_costs``, ``costs``) and read by the fake: a rule is
taken at a fault point (``Context.fault``, ``Context.storage_fault``) and ``fire`` gives
its action its meaning (docs/fake-cvmfs.md, "Fault injection"); ``command_costs`` is what
``transaction``, ``publish`` and ``ingest`` pad to, ``CALIBRATED_COSTS`` the durations
measured on the real tool.

The faults of the real tool that faults.md numbers are modelled where they happen:

- F1 (``tag -r`` argument limit, all or nothing): ``commands/tag.py``
- F2 (a revision and an automatic tag per publish): ``commands/publish.py``
- F3 (``check -i`` skips S3 storage): ``commands/check.py``
- F4 (the caller's umask reaches the storage): ``Repo.store_object`` writes under the
  umask, ``commands/publish.py`` fails the tagging step on an unreadable catalog
- F7: not modelled (one process)
- F8 (orphaned commands): ``Context`` (a publish stops at a broken pipe), the ``orphaned``
  action here
- F9 (publish killed with its group): ``commands/publish.py`` (union read-only while
  publishing)
- F10 (automatic gc inside publish): ``garbage.py`` and ``commands/publish.py``
- F5, F6 (client-side ownership, file capabilities): not modelled
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from tests.fake_cvmfs.server.files import flocked, read_json, write_json

if TYPE_CHECKING:
    from tests.fake_cvmfs.server.context import Context

FaultAction = Literal["fail", "hang", "die", "exit", "delay", "orphaned", "unreachable"]


def _rules_file(root: Path) -> Path:
    return root / "fake-faults.json"


def _rules_lock(root: Path) -> Path:
    return root / "fake" / "faults.lock"


def add_rule(
    root: Path,
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
    """Append a rule to ``ROOT/fake-faults.json`` (``FakeStratum0.inject_fault`` documents
    the arguments; a "storage" rule is taken at the point "access")."""
    path = _rules_file(root)
    with flocked(_rules_lock(root)):
        rules = read_json(path, [])
        rule: dict[str, object] = {"command": command, "action": action, "at": at}
        if command == "storage":
            rule["at"] = "access"
        optional: dict[str, object | None] = {
            "repo": repo,
            "exit_code": exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "times": times,
            "delay": delay,
        }
        rule.update({k: v for k, v in optional.items() if v is not None})
        rules.append(rule)
        write_json(path, rules)


def clear_rules(root: Path) -> None:
    """Remove every fault rule."""
    with flocked(_rules_lock(root)):
        _rules_file(root).unlink(missing_ok=True)


def pending_rules(root: Path) -> list[dict[str, object]]:
    """The rules still pending (rules with ``times`` disappear once used up)."""
    rules = read_json(_rules_file(root), [])
    return [dict(r) for r in rules] if isinstance(rules, list) else []


def take_fault(root: Path, command: str, at: str, repo: str | None) -> dict[str, Any] | None:
    """Find (and consume one use of) the first fault rule matching this point."""
    faults_file = _rules_file(root)
    if not faults_file.exists():
        return None
    with flocked(_rules_lock(root)):
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


def fire(
    ctx: Context,
    rule: dict[str, Any],
    at: str,
    fail: Callable[[dict[str, Any]], NoReturn] | None = None,
) -> None:
    """Apply a rule taken at fault point ``at``; ``fail`` is that point's recorded failure."""
    action = rule.get("action")
    if action == "orphaned":
        wait_orphaned(ctx)
    delay = rule.get("delay")
    if isinstance(delay, (int, float)) and delay > 0:
        time.sleep(float(delay))
    if action in ("delay", "orphaned"):
        return
    if action == "hang":
        hang(ctx)
    if action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "exit":
        ctx.out(str(rule.get("stdout") or ""))
        ctx.err(str(rule.get("stderr") or ""))
        os._exit(int(rule.get("exit_code", 1)))
    if action == "fail":
        if fail is not None:
            fail(rule)
        ctx.fail_with(rule, "", f"fake fault: {ctx.command} failed at {at}\n", 1)


def hang(ctx: Context) -> NoReturn:
    """Release the fake's internal locks and sleep until killed."""
    ctx.release_locks()
    while True:
        time.sleep(3600)


def wait_orphaned(ctx: Context) -> None:
    """Block until the process that started this command has died (re-parented)."""
    while os.getppid() == ctx.parent:
        time.sleep(0.02)


# Seconds the real CernVM-FS 2.12.0 `transaction`/`publish`/`ingest` take on a 2-core stratum 0
# with local storage, for FakeStratum0.set_costs (derivation in docs/fake-cvmfs.md, "Costs").
CALIBRATED_COSTS: dict[str, dict[str, float]] = {
    "transaction": {"base": 0.05},
    "publish": {
        "base": 0.30,
        "per_file": 0.000465,
        "per_graft": 0.00019,
        "unlocked_per_file": 0.0001,
    },
    "ingest": {"base": 0.39, "per_file": 0.0004},
}

# Keys of ``ROOT/fake-costs.json`` per command (seconds); see docs/fake-cvmfs.md.
COST_KEYS: dict[str, tuple[str, ...]] = {
    "transaction": ("base",),
    "publish": ("base", "per_file", "per_graft", "unlocked_per_file", "auto_gc"),
    "ingest": ("base", "per_file"),
}


def _costs_file(root: Path) -> Path:
    return root / "fake-costs.json"


def write_costs(root: Path, costs: Mapping[str, Mapping[str, float]] | None) -> None:
    """Write ``ROOT/fake-costs.json`` (None removes it: no padding, the default).

    ``costs`` maps a command to seconds by key (``COST_KEYS``); unknown commands or keys
    and negative values raise ValueError.
    """
    path = _costs_file(root)
    if costs is None:
        path.unlink(missing_ok=True)
        return
    rules: dict[str, dict[str, float]] = {}
    for command, rule in costs.items():
        allowed = COST_KEYS.get(command)
        if allowed is None:
            raise ValueError(f"no costs for command {command!r}")
        for key, value in rule.items():
            if key not in allowed or value < 0:
                raise ValueError(f"invalid cost {command}.{key}={value!r}")
        rules[command] = {key: float(value) for key, value in rule.items()}
    write_json(path, rules)


def command_costs(root: Path, command: str) -> dict[str, float]:
    """The cost rule of ``command`` in ``ROOT/fake-costs.json`` (empty: no padding).

    Unknown keys and values that are not non-negative numbers are ignored.
    """
    try:
        raw = json.loads(_costs_file(root).read_bytes())
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


def costs_in_effect(root: Path) -> dict[str, dict[str, float]]:
    """The costs in effect (empty when none are set)."""
    costs = {command: command_costs(root, command) for command in COST_KEYS}
    return {command: rule for command, rule in costs.items() if rule}
