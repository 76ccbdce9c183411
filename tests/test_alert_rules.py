"""The shipped Prometheus alert rules: promtool checks, their unit tests, and a real scrape.

promtool comes from the Debian package ``prometheus`` (.ci/run installs it). Without it
the promtool tests are skipped, and the skip message names the package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.service import Service
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import require, wait_for
from tests.test_maintenance import REPO, load_config, maintenance_toml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "config" / "prometheus" / "cvmfs-syncd-alerts.yml"
RULE_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yml"))
MISSING = (
    "promtool not found: install the Debian package 'prometheus' "
    "(apt-get install prometheus) to run the alert rule tests"
)

# The running daemon's repository is garbage-collectable (mkfs -z).
pytestmark = pytest.mark.stratum0(REPO, gc=True)


@pytest.fixture
def promtool() -> str:
    """The promtool executable; skip (saying which package provides it) when absent."""
    path = shutil.which("promtool")
    require(path, MISSING)
    assert path is not None
    return path


def _run(promtool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_check(promtool: str) -> None:
    """`promtool check rules` accepts the shipped rules file."""
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules`: every alert fires when it should and stays quiet otherwise."""
    assert RULE_TESTS
    result = _run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("SUCCESS") == len(RULE_TESTS)


def _alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    """Each alert of the rules file appears in the promtool tests with an expected firing."""
    firing: set[str] = set()
    name = ""
    lines = [line for path in RULE_TESTS for line in path.read_text().splitlines()]
    for line in lines:
        match = re.match(r"\s*alertname: (\w+)", line)
        if match:
            name = match.group(1)
        elif re.match(r"\s*- exp_labels:", line) and name:
            firing.add(name)
    expected = set(_alert_names())
    assert len(expected) >= 9
    assert expected - firing == set()
    assert {
        "CvmfsSyncdWhitelistExpiring",
        "CvmfsSyncdPublishStalled",
        "CvmfsSyncdTransactionOpenTooLong",
        "CvmfsSyncdPublishFailing",
        "CvmfsSyncdSourceDown",
        "CvmfsSyncdGcNotSuccessful",
        "CvmfsSyncdMasterKeyMissing",
    } <= expected


def _exported_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_rules_use_only_metrics_the_daemon_exports() -> None:
    """Every cvmfs_syncd_* name in the rules is a series the daemon defines (no typos)."""
    used = set(re.findall(r"\bcvmfs_syncd_\w+", RULES.read_text()))
    assert used
    assert used - _exported_names() == set()
    # Prometheus gives scraped series the target's `job` label: none of ours may use it.
    for family in Metrics().registry.collect():
        for sample in family.samples:
            assert "job" not in sample.labels


@pytest.fixture
def running(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[Service]:
    """A daemon in this process with maintenance scheduled, after its first publish."""
    (staging / "file.txt").write_text("content\n")
    config = load_config(
        tmp_path,
        stratum0,
        staging,
        maintenance_toml(gc_schedule='"0 3 * * 0"', check_schedule='"0 4 * * *"'),
    )
    service = Service(config)
    service.start()
    try:
        wait_for(lambda: "file.txt" in stratum0.published_tree(REPO), 30, "the first publish")
        yield service
    finally:
        if service.http is not None:
            service.http.stop()
        service.stop()


def test_scrape_of_a_running_daemon_passes_promtool_check_metrics(
    promtool: str, running: Service
) -> None:
    """A real /metrics scrape, every series initialised, lints clean with promtool."""
    assert running.http is not None
    url = f"http://127.0.0.1:{running.http.address[1]}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    # The fixture sees the file published as soon as the catalog is signed; the lane sets
    # its publish gauges a moment later.
    def ready() -> bool:
        text = scrape()
        return all(
            f'{series}{{repository="{REPO}"}}' in text
            for series in (
                "cvmfs_syncd_whitelist_expiry_timestamp_seconds",
                "cvmfs_syncd_last_publish_timestamp_seconds",
            )
        )

    wait_for(ready, 30, "the whitelist expiry and last publish series")
    text = scrape()
    for series in (
        "cvmfs_syncd_master_key_present",
        "cvmfs_syncd_maintenance_last_success_timestamp_seconds",
        "cvmfs_syncd_maintenance_failures_total",
        "cvmfs_syncd_maintenance_failing",
        "cvmfs_syncd_maintenance_enabled_since_timestamp_seconds",
        "cvmfs_syncd_foreign_transaction_open",
        "cvmfs_syncd_transaction_open_since_timestamp_seconds",
        "cvmfs_syncd_publishes_total",
        "cvmfs_syncd_last_publish_timestamp_seconds",
        "cvmfs_syncd_source_up",
    ):
        assert f"{series}{{" in text, series
    result = _run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""
