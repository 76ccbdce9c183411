"""Tests of the key declarations: the reference file, unknown keys, types and defaults."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "cvmfs-syncd.toml"

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.]+)\s*\]\]?")
_KEY = re.compile(r"^\s*#?\s*([A-Za-z0-9_]+)\s*=")


def _reference_keys() -> dict[str, tuple[bool, set[str]]]:
    """Table header -> (is an array of tables, keys set or commented out) of the file."""
    found: dict[str, tuple[bool, set[str]]] = {"": (False, set())}
    header = ""
    for line in EXAMPLE.read_text().splitlines():
        if match := _HEADER.match(line):
            header = match.group(2)
            array = match.group(1) == "[["
            assert found.setdefault(header, (array, set()))[0] == array, f"[{header}] twice"
        elif match := _KEY.match(line):
            found[header][1].add(match.group(1))
    return found


def _declared() -> dict[str, tuple[bool, set[str]]]:
    """Table header -> (is an array of tables, scalar keys) from the declarations."""
    out = {}
    for header, array, cls in config_mod.declared_tables(config_mod.Config):
        names = {d.name for d in config_mod.declared_keys(cls) if not _is_table(d.kind)}
        out[header] = (array, names)
    return out


def _is_table(kind: Any) -> bool:
    args = get_args(kind)
    return hasattr(kind, "__dataclass_fields__") or bool(
        args and hasattr(args[0], "__dataclass_fields__")
    )


def test_reference_file_lists_exactly_the_declared_keys() -> None:
    """Every declared key appears in the reference file under its table, and nothing else."""
    declared, written = _declared(), _reference_keys()
    assert set(written) == set(declared), "tables of config/cvmfs-syncd.toml"
    for header, (array, keys) in declared.items():
        missing = sorted(keys - written[header][1])
        extra = sorted(written[header][1] - keys)
        where = f"[{header}]" if header else "the top level"
        assert not missing, f"add to {where}: {missing}"
        assert not extra, f"not declared in {where}: {extra}"
        assert written[header][0] == array, f"{where} is an array of tables: {array}"


def test_every_key_is_documented_and_typed() -> None:
    """Each declared key has a line of documentation and a resolved type."""
    for header, _, cls in config_mod.declared_tables(config_mod.Config):
        for d in config_mod.declared_keys(cls):
            assert d.key.doc.strip(), f"{header}.{d.name}"
            assert not isinstance(d.kind, str), f"{header}.{d.name}"


def test_modes_and_levels_are_literals() -> None:
    """The accepted words of mode, log_level and log_format come from their Literal types."""
    kinds = {f.name: f.type for f in fields(config_mod.StagingConfig)}
    assert kinds["mode"] == "SourceMode"
    assert get_origin(config_mod.SourceMode) is Literal
    assert set(get_args(config_mod.SourceMode)) == {"mirror", "inbox"}
    assert set(get_args(config_mod.LogLevel)) == {"debug", "info", "warning", "error"}
    assert set(get_args(config_mod.LogFormat)) == {"auto", "json", "console"}
    data = _minimal(s3=[{"bucket": "b", "mode": "Mirror"}])
    data["daemon"].update(log_level="WARNING", log_format="xml")
    problems = _problems(data)
    assert "daemon.log_format: must be one of 'auto', 'json', 'console'; got 'xml'" in problems
    assert any(p.startswith("repository[0].s3[0].mode: must be one of") for p in problems)
    assert not any(p.startswith("daemon.log_level") for p in problems)
    data = _minimal()
    data["daemon"]["log_level"] = "WARNING"
    assert config_mod.validate(data).daemon.log_level == "warning"


def _minimal(**repo: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "r.example.org",
        "staging": [{"path": "/srv/s", "target": "/sw"}],
    }
    base.update(repo)
    return {"daemon": {"state_dir": "/var/lib/x"}, "repository": [base]}


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_mod.validate(data)
    return caught.value.problems


def test_unknown_key_suggests_a_close_declared_one() -> None:
    """A misspelt key is reported with the declared key it most resembles, if any."""
    data = _minimal(quiet_secnds=3, stagign=[], frobnicate=1)
    data["repository"][0]["staging"][0]["setle_seconds"] = 1
    data["repository"][0]["maintenance"] = {"gc_keep_revision": 3}
    data["deamon"] = {}
    problems = _problems(data)
    for expected in (
        "deamon: unknown key (did you mean 'daemon'?)",
        "repository[0].quiet_secnds: unknown key (did you mean 'quiet_seconds'?)",
        "repository[0].stagign: unknown key (did you mean 'staging'?)",
        "repository[0].frobnicate: unknown key",
        "repository[0].staging[0].setle_seconds: unknown key (did you mean 'settle_seconds'?)",
        "repository[0].maintenance.gc_keep_revision: unknown key"
        " (did you mean 'gc_keep_revisions'?)",
    ):
        assert expected in problems, expected
    assert len(problems) == 6


def test_defaults_come_from_the_declaration() -> None:
    """A minimal file yields every declared default; the file names of renamed keys hold."""
    data = _minimal(s3=[{"bucket": "b", "target": "/ci"}])
    del data["daemon"]
    cfg = config_mod.validate(data)
    assert cfg.daemon == config_mod.DaemonConfig()
    assert cfg.cvmfs == config_mod.CvmfsConfig()
    repo = cfg.repositories[0]
    assert repo.maintenance == config_mod.MaintenanceConfig()
    assert repo.staging[0] == config_mod.StagingConfig(path=Path("/srv/s"), target="/sw")
    assert repo.s3[0] == config_mod.S3Config(bucket="b", target="/ci")
    assert cfg.daemon.prepare_workers == 2
    assert repo.staging[0].prepare and repo.s3[0].prepare
    names = {d.name: d.attr for d in config_mod.declared_keys(config_mod.MaintenanceConfig)}
    assert names["gc_keep"] == "gc_keep_seconds"
    assert names["resign_before_expiry"] == "resign_before_expiry_seconds"


@pytest.mark.parametrize(
    ("daemon", "expected"),
    [
        ({"prepare_workers": 0}, "daemon.prepare_workers: must be from 1 to 64, got 0"),
        ({"prepare_workers": 65}, "daemon.prepare_workers: must be from 1 to 64, got 65"),
        ({"prepare_workers": "2"}, "daemon.prepare_workers: expected an integer, got '2'"),
        ({"prepare_workers": True}, "daemon.prepare_workers: expected an integer, got True"),
        ({"stall_seconds": "soon"}, "daemon.stall_seconds: 'soon' is not a duration"),
        ({"state_dir": 3}, "daemon.state_dir: must be an absolute path, got 3"),
    ],
)
def test_values_are_checked_by_their_declaration(daemon: dict[str, Any], expected: str) -> None:
    """Type, unit and range come from the declaration, reported with the key path."""
    data = _minimal()
    data["daemon"].update(daemon)
    assert any(p.startswith(expected) for p in _problems(data)), _problems(data)


def test_values_in_range_are_accepted() -> None:
    """Bounds are inclusive; a per-source prepare is a boolean."""
    data = _minimal(s3=[{"bucket": "b", "target": "/ci", "prepare": False}])
    data["daemon"]["prepare_workers"] = 64
    data["repository"][0]["staging"][0]["prepare"] = False
    cfg = config_mod.validate(data)
    assert cfg.daemon.prepare_workers == 64
    assert not cfg.repositories[0].staging[0].prepare
    assert not cfg.repositories[0].s3[0].prepare
    data["repository"][0]["staging"][0]["prepare"] = "no"
    assert "repository[0].staging[0].prepare: expected true or false, got 'no'" in _problems(data)


def test_tables_and_arrays_of_the_wrong_shape() -> None:
    """A table that is not one, or an array of tables that is not one, is named precisely."""
    problems = _problems({"daemon": 3, "repository": [{"name": "a", "staging": {}}, "b"]})
    assert problems == [
        "daemon: expected a table",
        "repository[0].staging: expected an array of tables ([[repository.staging]])",
        "repository[1]: expected a table",
    ]
    assert _problems({}) == ["repository: at least one [[repository]] is required"]


def test_a_repeated_repository_is_named_by_its_own_index() -> None:
    """Checks between tables name the table they concern."""
    data = {
        "repository": [
            {"name": ""},
            {"name": "a.org"},
            {"name": "a.org", "maintenance": {"resign_before_expiry": "40d"}},
        ]
    }
    problems = _problems(data)
    assert "repository[2].name: 'a.org' is configured twice" in problems
    assert any(p.startswith("repository[2].maintenance.resign_before_expiry:") for p in problems)
