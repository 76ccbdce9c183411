"""Tests of configuration loading and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "cvmfs-syncd.toml"


def _minimal(**repo: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "r.example.org", "staging": [{"path": "/srv/s"}]}
    base.update(repo)
    return {"daemon": {"state_dir": "/var/lib/x"}, "repository": [base]}


def test_example_config_is_valid() -> None:
    """The shipped example configuration validates and keeps the documented key names."""
    cfg = config_mod.load(EXAMPLE)
    repo = cfg.repository("software.example.org")
    assert repo.quiet_seconds == 5
    assert repo.max_batch_seconds == 60
    assert repo.staging[0].graft_threshold == 256 * 1024**2
    assert repo.staging[0].mode == "mirror"
    assert cfg.repository("ci.example.org").s3[0].copy_below == 1024**2
    assert cfg.daemon.metrics_address == "127.0.0.1:9477"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256MiB", 256 * 1024**2), ("1GiB", 1024**3), ("10B", 10), ("3KiB", 3072), (7, 7), ("5", 5)],
)
def test_parse_size(text: object, expected: int) -> None:
    """Sizes are read with binary units or as plain bytes."""
    assert config_mod.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "-1", "MiB", True, 1.5j, "1.5.2MiB"])
def test_parse_size_rejects(bad: object) -> None:
    """Anything that is not a size is refused with ValueError."""
    with pytest.raises(ValueError, match="size"):
        config_mod.parse_size(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7d", 7 * 86400), ("90s", 90), ("5m", 300), ("2h", 7200), (3, 3), ("4", 4)],
)
def test_parse_duration(text: object, expected: float) -> None:
    """Durations are read with s/m/h/d units or as plain seconds."""
    assert config_mod.parse_duration(text) == expected


def test_every_error_is_reported_with_its_key_path() -> None:
    """Validation collects every problem at once, each naming where it is."""
    data = {
        "daemon": {"state_dir": "relative", "metrics_address": "nope", "bogus": 1},
        "cvmfs": {"server_command": ""},
        "repository": [
            {
                "name": "",
                "quiet_seconds": "soon",
                "staging": [{"path": "rel/path", "mode": "sideways", "target": "/../x"}],
                "maintenance": {"gc_keep": "3d", "gc_keep_revisions": 2, "resign_days": 400},
            }
        ],
    }
    with pytest.raises(ConfigError) as caught:
        config_mod.validate(data)
    text = str(caught.value)
    for fragment in (
        "daemon.state_dir",
        "daemon.metrics_address",
        "daemon.bogus: unknown key",
        "cvmfs.server_command",
        "repository[0].name: required",
        "repository[0].quiet_seconds",
        "repository[0].staging[0].path",
        "repository[0].staging[0].mode",
        "repository[0].staging[0].target",
        "gc_keep and gc_keep_revisions are exclusive",
        "repository[0].maintenance.resign_days",
    ):
        assert fragment in text, fragment
    assert len(caught.value.problems) >= 11


def test_overlapping_targets_are_refused() -> None:
    """Two sources whose targets contain one another cannot be configured together."""
    data = _minimal(
        staging=[{"path": "/srv/a", "target": "/"}, {"path": "/srv/b", "target": "/sub"}]
    )
    with pytest.raises(ConfigError, match=r"staging\[1\]\.target.*overlaps"):
        config_mod.validate(data)


def test_overlapping_s3_and_staging_targets_are_refused() -> None:
    """An S3 prefix and a staging directory publishing into the same directory are refused."""
    data = _minimal(
        staging=[{"path": "/srv/a", "target": "/ci/x"}],
        s3=[{"bucket": "b", "target": "/ci"}],
    )
    with pytest.raises(ConfigError, match="overlaps"):
        config_mod.validate(data)


def test_disjoint_targets_are_accepted() -> None:
    """Sibling targets do not overlap."""
    data = _minimal(
        staging=[{"path": "/srv/a", "target": "/a"}, {"path": "/srv/b", "target": "/ab"}]
    )
    cfg = config_mod.validate(data)
    assert [s.target for s in cfg.repositories[0].staging] == ["/a", "/ab"]


def test_same_staging_path_twice_is_refused() -> None:
    """One staging directory cannot feed two sources (nested paths neither)."""
    data = {
        "daemon": {"state_dir": "/var/lib/x"},
        "repository": [
            {"name": "a.org", "staging": [{"path": "/srv/s"}]},
            {"name": "b.org", "staging": [{"path": "/srv/s/inner"}]},
        ],
    }
    with pytest.raises(ConfigError, match="overlaps staging path"):
        config_mod.validate(data)


def test_server_command_accepts_string_or_list() -> None:
    """A command is split like a shell word list, or taken as a list."""
    data = _minimal()
    data["cvmfs"] = {"server_command": "/opt/fake --root '/tmp/a b'"}
    assert config_mod.validate(data).cvmfs.server_command == ("/opt/fake", "--root", "/tmp/a b")
    data["cvmfs"] = {"server_command": ["x", "y"]}
    assert config_mod.validate(data).cvmfs.server_command == ("x", "y")


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    """A missing file and a TOML syntax error are configuration errors naming the file."""
    with pytest.raises(ConfigError, match="does not exist"):
        config_mod.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        config_mod.load(bad)


def test_targets_overlap() -> None:
    """Overlap means equality or one containing the other, by path components."""
    assert config_mod.targets_overlap("/", "/x")
    assert config_mod.targets_overlap("/a/b", "/a")
    assert not config_mod.targets_overlap("/a", "/ab")
