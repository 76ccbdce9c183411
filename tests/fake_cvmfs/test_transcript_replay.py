"""Replays of the recorded ``cvmfs_server`` transcripts against the fake.

Every ``cvmfs_server`` step of a recording is run against the fake with the recorded
arguments (paths moved below the fake's ROOT) and compared: exit code, stdout and stderr
after normalising what legitimately differs (ROOT prefix, hashes, dates, PIDs, stack-trace
addresses, other repositories in ``list``), and the recorded state (lock files, mount
mode, spool entries, revision deltas, whether the root hash changed).  Shell steps that
write into the repository are replayed too; steps that need tools the fake cannot stand in
for (swissknife, curl, the recorder's S3 proxy) are skipped or replaced by the fake's
equivalents (fault injection, ``FakeStratum0.unmount``).  Deviations are listed in
``OVERRIDES`` with the reason.

The recordings that cannot be replayed step by step (they depend on object hashes of
content the recorder generated, on swissknife or on S3) are reproduced by the scripted
tests at the end of this module, which assert the recorded messages and hashes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import pwd
import random
import re
import shlex
import signal
import subprocess
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_cvmfs.stratum0 import FakeStratum0, RepoState
from tests.support import needs, reference_dir

REFERENCE_DIR = reference_dir()
TRANSCRIPTS = REFERENCE_DIR / "transcripts"

pytestmark = needs(TRANSCRIPTS.is_dir(), f"reference recordings not found at {TRANSCRIPTS}")

Step = dict[str, Any]

# The first recording session, in the order it was recorded: each transcript starts from
# the state the previous one left, so they are replayed as one chain on one fake root.
SESSION_ONE = [
    "mkfs",
    "transaction",
    "b_double_transaction",
    "c_publish_abort_without_txn",
    "d_publish_with_open_writer",
    "e_publish_cwd_inside",
    "f_path_scoped_transaction",
    "g_gc",
]

# Transcripts of the later session that replay on a fresh root with these repositories.
STANDALONE = {
    "h_resign": ["ref.local"],
    "k_s3_cycle": [],
    "l_stale_mount": ["ref.local"],
    "m_ingest": ["ref.local"],
    "m2_ingest": ["ing.gw.local"],
    "o_gc_and_transactions": ["ref.local", "refgc.local"],
}

# (transcript, step) -> why the fake deliberately differs or how the step is adapted.
OVERRIDES: dict[tuple[str, int], str] = {
    ("b_double_transaction", 4): "killed by the recorder while waiting: wait, then kill",
    ("c_publish_abort_without_txn", 15): "the orphan of b 4 opened a transaction: do it here",
    ("h_resign", 64): "needs the faketime binary",
    ("h_resign", 77): "libfaketime artefact (README caveat): not modelled",
    ("h_resign", 80): "lists the manifest written by the faketime artefact step",
    ("l_stale_mount", 4): "timed out only because another repository's S3 endpoint hung",
    ("l_stale_mount", 14): "slow only because another repository's S3 endpoint hung",
    ("l_stale_mount", 44): "timed out only because another repository's S3 endpoint hung",
    ("o_gc_and_transactions", 5): "polls lock files with timing the fake does not share",
    **{
        ("m_ingest", step): "tarball ingest failed on that build (README caveat: no tar format "
        "registered); m2_ingest is the reference, the step is not run"
        for step in (3, 6, 8, 16, 21, 27)
    },
    ("m_ingest", 5): "lists the tags of the recorder's earlier history of ref.local",
}

# cvmfs_server steps that are not run (their OVERRIDES entry says why).
NOT_RUN = {
    ("h_resign", 64),
    ("h_resign", 77),
    ("h_resign", 80),
    *((name, step) for name, step in OVERRIDES if name == "m_ingest"),
}

# sh steps whose output (not just exit code) is compared.
COMPARE_SH_OUTPUT = {("o_gc_and_transactions", 6), ("o_gc_and_transactions", 8)}

# Steps before which the replay injects a fault so that a race resolves as recorded.
PRE_ACTIONS: dict[tuple[str, int], Callable[[FakeStratum0], None]] = {
    ("o_gc_and_transactions", 6): lambda fake: fake.inject_fault(
        "gc", "delay", at="locked", delay=1.5, times=1
    ),
    ("c_publish_abort_without_txn", 15): lambda fake: _open_transaction(fake, "ref.local"),
}


def _open_transaction(fake: FakeStratum0, repo: str) -> None:
    """Open a transaction (what the orphaned waiter of b_double_transaction 4 did)."""
    fake.check_run("transaction", repo)


def load(name: str) -> list[Step]:
    """The steps of one transcript."""
    lines = (TRANSCRIPTS / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def scenario_repo(name: str, step: int) -> str:
    """The repository a step's recorded state is about (see the reference README)."""
    if name in ("j_s3_publish_failure", "k_s3_cycle", "n2_graft_publish_s3"):
        return "refs3.local"
    if name == "m2_ingest":
        return "ing.gw.local"
    if name in ("g_gc", "o_gc_and_transactions"):
        return "refgc.local"
    if name == "h_resign" and step >= 29:
        return "refexp.local"
    if name == "n_graft_publish" and step >= 102:
        return "refgc.local"
    return "ref.local"


# -- normalisation ---------------------------------------------------------------------------

HEX = re.compile(r"\b[0-9a-f]{40}(-rmd160|-shake128)?[CPHXML]?\b")
AUTO_TAG = re.compile(r"generic(_\d+)?-\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
GMT = re.compile(r"\[\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\]")
DAY = re.compile(r"\d\d \w{3} \d{4} \d\d:\d\d:\d\d")
SLASH_DATE = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d")
LSOF = re.compile(r"^(\S+) +\d+ +(\S+) +(/\S.*)$")


def normalise(text: str, root: Path, repos: set[str], *, sort: bool = False) -> list[str]:
    """Lines of an output with run-specific details replaced by placeholders."""
    text = text.replace(str(root), "")
    lines: list[str] = []
    in_trace = False
    for raw in text.split("\n"):
        line = raw
        if line == "Stacktrace:":
            in_trace = True
            lines.append(line)
            continue
        if in_trace:
            if line == "":
                in_trace = False
            else:
                continue
        if line.startswith("cvmfs2 "):
            continue
        list_match = re.match(r"^(\S+) \(stratum0 / ", line)
        if list_match and list_match.group(1) not in repos:
            continue
        if re.match(r"^  sweep: [0-9a-f]{40}H$", line):
            continue
        line = re.sub(
            r"Scanning \d+ tag database objects", "Scanning <N> tag database objects", line
        )
        line = AUTO_TAG.sub("<TAG>", line)
        line = HEX.sub("<HASH>", line)
        line = GMT.sub("[<DATE>]", line)
        line = DAY.sub("<DATE>", line)
        line = SLASH_DATE.sub("<DATE>", line)
        line = re.sub(r"<HASH> \d+ (\d+) \d{9,} ", r"<HASH> <SIZE> \1 <T> ", line)
        line = re.sub(r"Catalog Size: [\d.]+ kiB", "Catalog Size: <SIZE>", line)
        line = re.sub(r"─+", "─", line)
        line = re.sub(r" {2,}(?=│)", " ", line)
        line = re.sub(r"(?<=│) {2,}", " ", line)
        lsof = LSOF.match(line)
        if lsof and lsof.group(3).startswith("/cvmfs/"):
            line = f"{lsof.group(1)} <PID> {lsof.group(2)} {lsof.group(3)}"
        lines.append(line)
    return sorted(lines) if sort else lines


# -- replay engine -----------------------------------------------------------------------------

PATHS = re.compile(r"(?<![\w.-])(/var/spool/cvmfs/|/srv/cvmfs/|/etc/cvmfs/|/cvmfs/)")
UNSUPPORTED = ("curl ", "attr ", "<recorder>", "faketime", "cvmfs_swissknife", "lsof ")


class Replayer:
    """Runs recorded steps against a fake and collects the differences."""

    def __init__(self, fake: FakeStratum0, scratch: Path) -> None:
        self.fake = fake
        self.scratch = scratch
        self.background: dict[int, subprocess.Popen[bytes]] = {}
        self.tag_names: dict[str, int] = {}
        self.problems: list[str] = []
        self.current = ""
        self.compared: dict[str, int] = {}

    # -- helpers ------------------------------------------------------------------------
    def path(self, text: str) -> str:
        """Move recorded absolute paths below the fake's ROOT (symlink targets stay as-is)."""
        kept: list[str] = []

        def keep(match: re.Match[str]) -> str:
            kept.append(match.group(0))
            return f"\0{len(kept) - 1}\0"

        text = re.sub(r"ln -s /\S+", keep, text)
        text = PATHS.sub(lambda m: f"{self.fake.root}{m.group(1)}", text)
        text = re.sub(r"\0(\d+)\0", lambda m: kept[int(m.group(1))], text)
        text = text.replace("<tmp>", str(self.scratch))
        for recorded, process in self.background.items():
            text = text.replace(f"/proc/{recorded}/", f"/proc/{process.pid}/")
        return text

    def repos(self) -> set[str]:
        """Repositories that exist in the fake."""
        base = self.fake.config_dir / "repositories.d"
        return {p.name for p in base.iterdir()} if base.is_dir() else set()

    def problem(self, step: Step, text: str) -> None:
        """Record a difference."""
        self.problems.append(f"{self.current} step {step['step']} {step['argv'][:4]}: {text}")

    def learn_tags(self, step: Step) -> None:
        """Remember which revision each recorded auto tag name belongs to."""
        for line in step.get("stdout", "").splitlines():
            cells = [c.strip() for c in line.split("│")]
            if len(cells) == 5 and AUTO_TAG.fullmatch(cells[0]) and cells[1].isdigit():
                self.tag_names[cells[0]] = int(cells[1])
            fields = line.split()
            if len(fields) >= 4 and AUTO_TAG.fullmatch(fields[0]) and fields[3].isdigit():
                self.tag_names[fields[0]] = int(fields[3])
        match = re.search(r"Using auto tag '([^']+)'", step.get("stdout", ""))
        after = step.get("state_after") or {}
        if match and step.get("exit_code") == 0 and after.get("revision") is not None:
            self.tag_names[match.group(1)] = int(after["revision"])

    def map_tag(self, token: str, repo: str) -> str:
        """Translate a recorded auto tag name into the fake's tag of the same revision."""
        revision = self.tag_names.get(token)
        if revision is None:
            return token
        ours = [n for n, r in self.fake.tags(repo).items() if r == revision and AUTO_TAG.match(n)]
        return ours[0] if len(ours) == 1 else token

    @staticmethod
    def stdin_of(step: Step) -> bytes:
        """The stdin the recorder gave a step."""
        if "stdin" in step:
            return str(step["stdin"]).encode()
        note = step.get("note") or ""
        if step.get("stdin_bytes") == 2:
            return b"y\n" if "answering y" in note else b"n\n"
        return b""

    # -- steps -------------------------------------------------------------------------------
    def replay(self, name: str, *, check: bool = True) -> None:
        """Replay every step of a transcript."""
        self.current = name
        before = len(self.problems)
        for step in load(name):
            key = (name, int(step["step"]))
            action = PRE_ACTIONS.get(key)
            if action is not None:
                action(self.fake)
            self.run_step(name, step)
            self.learn_tags(step)
        if not check:
            del self.problems[before:]

    def run_step(self, name: str, step: Step) -> None:
        """Dispatch one recorded step."""
        argv: list[str] = list(step["argv"])
        key = (name, int(step["step"]))
        if not argv or key in NOT_RUN:
            return
        if argv[0] == "faketime":
            days = int(argv[2].strip("+d"))
            self.fake.set_clock_offset(days * 86400)
            try:
                self.server_step(name, step, argv[3:])
            finally:
                self.fake.set_clock(None)
        elif argv[0] == "cvmfs_server":
            self.server_step(name, step, argv)
        elif argv[0] == "umount":
            self.umount_step(step, argv[1])
        elif argv[0] == "kill":
            process = self.background.pop(int(argv[-1]), None)
            if process is not None:
                process.kill()
                process.wait()
        elif argv[:2] == ["sh", "-c"]:
            self.shell_step(name, step, argv[2])

    def umount_step(self, step: Step, target: str) -> None:
        """`umount` of the union or rdonly mount becomes FakeStratum0.unmount."""
        repo = target.rstrip("/").split("/")[-2 if target.endswith("rdonly") else -1]
        state = self.fake.state(repo)
        rdonly = target.endswith("/rdonly")
        mounted = state["rdonly_mounted"] if rdonly else state["mount_mode"] is not None
        expected = 0 if mounted else 32
        if expected != step["exit_code"]:
            self.problem(step, f"umount: fake mount state differs ({state})")
        self.fake.unmount(repo, union=not rdonly, rdonly=rdonly)
        self.compare_state(step, scenario_repo(self.current, int(step["step"])), None)

    def shell_step(self, name: str, step: Step, script: str) -> None:
        """Run a recorded shell helper with translated paths (background ones too)."""
        key = (name, int(step["step"]))
        if any(marker in script for marker in UNSUPPORTED) or key in OVERRIDES:
            return
        if name in CLIENT_VIEW_TRANSCRIPTS:
            seen = ClientView(self).run(script)
            if seen is not None:
                code, stdout, stderr = seen
                if code != step["exit_code"]:
                    self.problem(step, f"sh exit {code} != {step['exit_code']}: {stderr}")
                self.compare_text(step, "stdout", stdout)
                self.compare_text(step, "stderr", stderr)
                self.compare_state(step, scenario_repo(name, int(step["step"])), None)
                return
        translated = self.path(script)
        env = dict(os.environ, PATH=f"{self.fake.root / 'bin'}:{os.environ.get('PATH', '')}")
        if step["exit_code"] is None and "pid" in step:
            command = "exec " + translated.strip().removesuffix("&").strip()
            process = subprocess.Popen(["/bin/sh", "-c", command], env=env)
            self.background[int(step["pid"])] = process
            self.wait_for_fd(process.pid)
            return
        result = subprocess.run(
            ["/bin/sh", "-c", translated],
            capture_output=True,
            env=env,
            cwd=self.path(step.get("cwd", str(self.scratch))),
            check=False,
            timeout=120,
        )
        stderr = result.stderr.decode(errors="replace")
        if "Read-only file system" in step.get("stderr", ""):
            # The fake's union dir is a plain directory: the write succeeds, is logged as a
            # violation and reverted at the next command.
            before = len(self.fake.violations())
            repo = scenario_repo(name, int(step["step"]))
            if len(self.fake.scan_violations(repo)) <= before:
                self.problem(step, "write outside a transaction was not logged")
            return
        if result.returncode != step["exit_code"]:
            self.problem(step, f"sh exit {result.returncode} != {step['exit_code']}: {stderr}")
        if key in COMPARE_SH_OUTPUT:
            self.compare_text(step, "stdout", result.stdout.decode(errors="replace"))
            self.compare_text(step, "stderr", stderr)

    def wait_for_fd(self, pid: int) -> None:
        """Wait until a background helper holds a file below ROOT open."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                targets = [str(p.readlink()) for p in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:
                targets = []
            if any(t.startswith(str(self.fake.root)) for t in targets):
                return
            time.sleep(0.01)

    def server_step(self, name: str, step: Step, argv: list[str]) -> None:
        """Run a cvmfs_server step and compare it with the recording."""
        key = (name, int(step["step"]))
        repo = scenario_repo(name, int(step["step"]))
        args = [self.map_tag(self.path(a), repo) for a in argv[1:]]
        if args and args[0] == "mkfs" and "-w" not in args:
            target = args[-1]
            args[1:1] = ["-w", f"http://localhost/cvmfs/{target}"]
        before = self.fake.state(repo)
        if step["exit_code"] == "timeout" and key == ("b_double_transaction", 4):
            self.waiting_transaction(step, args)
            self.compare_state(step, repo, before)
            return
        cwd = Path(self.path(step["cwd"])) if "cwd" in step else self.scratch
        result = self.fake.run(*args, stdin=self.stdin_of(step), cwd=cwd)
        expected = 0 if step["exit_code"] == "timeout" else step["exit_code"]
        if result.returncode != expected:
            self.problem(
                step, f"exit {result.returncode} != {expected}\n{result.stdout}\n{result.stderr}"
            )
        self.compared[name] = self.compared.get(name, 0) + 1
        sort = args[0] in ("gc", "diff")
        self.compare_text(step, "stdout", result.stdout, sort=sort)
        self.compare_text(step, "stderr", result.stderr, sort=sort)
        self.compare_state(step, repo, before)

    def waiting_transaction(self, step: Step, args: list[str]) -> None:
        """`transaction -t 0` waits forever: check it is still retrying, then kill it."""
        process = subprocess.Popen(
            [str(self.fake.server_command), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=1.5)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, _ = process.communicate()
        lines = set(stdout.decode().splitlines())
        if lines != {"repository busy, retrying"}:
            self.problem(step, f"waiting transaction printed {lines}")

    def compare_text(self, step: Step, stream: str, actual: str, *, sort: bool = False) -> None:
        """Compare a normalised output stream with the recording."""
        repos = self.repos()
        recorded = normalise(step.get(stream) or "", Path("/nonexistent"), repos, sort=sort)
        actual = actual.replace(str(self.fake.root), "").replace(str(self.scratch), "<tmp>")
        ours = normalise(actual, self.fake.root, repos, sort=sort)
        if recorded != ours:
            self.problem(step, f"{stream} differs\nrecorded: {recorded}\nfake:     {ours}")

    def compare_state(self, step: Step, repo: str, before: RepoState | None) -> None:
        """Compare lock files, mounts, spool entries, revision delta and root hash change."""
        recorded = step.get("state_after")
        if not recorded:
            return
        ours: dict[str, Any] = dict(self.fake.state(repo))
        for key in ("in_transaction_lock", "is_publishing_lock", "mount_mode", "rdonly_mounted"):
            if recorded.get(key) != ours.get(key):
                self.problem(
                    step, f"state {key}: recorded {recorded.get(key)} fake {ours.get(key)}"
                )
        if (
            "in_transaction_lock_content" in recorded
            and ours.get("in_transaction_lock_content") != recorded["in_transaction_lock_content"]
        ):
            self.problem(step, "in_transaction.lock content differs")
        if recorded.get("spool_files") is not None or ours.get("spool_files") is not None:
            mine = [f for f in ours.get("spool_files") or [] if not f.startswith("tmp.")]
            theirs = [f for f in recorded.get("spool_files") or [] if not f.startswith("tmp.")]
            if mine != theirs:
                self.problem(step, f"spool files: recorded {theirs} fake {mine}")
        recorded_before = step.get("state_before") or {}
        if before is None:
            return
        if recorded.get("revision") is not None and recorded_before.get("revision") is not None:
            delta = recorded["revision"] - recorded_before["revision"]
            ours_delta = (ours.get("revision") or 0) - (before["revision"] or 0)
            if delta != ours_delta:
                self.problem(step, f"revision delta recorded {delta} fake {ours_delta}")
            changed = recorded.get("root_hash") != recorded_before.get("root_hash")
            if changed != (ours.get("root_hash") != before["root_hash"]):
                self.problem(step, "root hash change differs")

    def close(self) -> None:
        """Stop background helpers and stray fake processes."""
        for process in self.background.values():
            process.kill()
            process.wait()
        self.background.clear()
        self.fake.kill_orphans()


# -- ingest: the recorder's inputs, and shell steps read through the client's view -------------

MTIME = 1_700_000_000  # 2023-11-14 22:13, the members' time in the recorded listings


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> None:
    """Write a GNU tar of ``members`` (names may carry surrogates for raw bytes)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for info in members:
            info.mtime = MTIME
            info.uname = info.uname or "root"
            info.gname = info.gname or "root"
            content = data.get(info.name)
            if content is not None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    return info


def m2_inputs(fake: FakeStratum0, scratch: Path) -> None:
    """The tarballs of m2_ingest, rebuilt from the recorded ``tar -tvf`` listings."""
    del fake
    two = dict.fromkeys(("/abs/evil.txt", "../escape.txt", "d/../../escape2.txt"), b"x\n")
    _tar(
        scratch / "small.tar",
        [
            _member("pkg/", tarfile.DIRTYPE, 0o755),
            _member("pkg/a.txt"),
            _member("pkg/b.txt"),
            _member("top.txt"),
        ],
        {"pkg/a.txt": b"a v1\n", "pkg/b.txt": b"b v1\n", "top.txt": b"top\n"},
    )
    _tar(
        scratch / "small2.tar",
        [_member("pkg/", tarfile.DIRTYPE, 0o755), _member("pkg/a.txt"), _member("pkg/c.txt")],
        {"pkg/a.txt": b"a v2 changed\n", "pkg/c.txt": b"c new\n"},
    )
    _tar(scratch / "hostile-absolute.tar", [_member("/abs/evil.txt")], two)
    _tar(
        scratch / "hostile-dotdot.tar",
        [
            _member("d/", tarfile.DIRTYPE, 0o755),
            _member("../escape.txt"),
            _member("d/../../escape2.txt"),
            _member("d/ok.txt"),
        ],
        {**two, "d/ok.txt": b"k\n"},
    )
    _tar(
        scratch / "hostile-symlink_out.tar",
        [
            _member("link-abs", tarfile.SYMTYPE, link="/etc/passwd"),
            _member("link-up", tarfile.SYMTYPE, link="../../../../../etc"),
            _member("link-dangling", tarfile.SYMTYPE, link="nowhere/x"),
        ],
        {},
    )
    _tar(
        scratch / "hostile-hardlink.tar",
        [_member("plain.txt"), _member("hard.txt", tarfile.LNKTYPE, link="plain.txt")],
        {"plain.txt": b"plain\n"},
    )
    _tar(
        scratch / "hostile-hardlink_out.tar",
        [_member("hard-out", tarfile.LNKTYPE, link="/etc/passwd")],
        {},
    )
    _tar(scratch / "hostile-fifo.tar", [_member("fifo", tarfile.FIFOTYPE)], {})
    null = _member("chr-null", tarfile.CHRTYPE, 0o666)
    null.devmajor, null.devminor = 1, 3
    sda = _member("blk-sda", tarfile.BLKTYPE, 0o660)
    sda.devmajor, sda.devminor = 8, 0
    _tar(scratch / "hostile-devices.tar", [null, sda], {})
    _tar(
        scratch / "hostile-cvmfscatalog.tar",
        [
            _member("sub/", tarfile.DIRTYPE, 0o755),
            _member(".cvmfscatalog"),
            _member("sub/.cvmfscatalog"),
            _member("sub/f.txt"),
        ],
        {".cvmfscatalog": b"", "sub/.cvmfscatalog": b"", "sub/f.txt": b"f\n"},
    )
    deep = "d" * 120
    _tar(
        scratch / "hostile-longname.tar",
        [
            _member("L" * 300),
            _member(deep + "/", tarfile.DIRTYPE, 0o755),
            _member(f"{deep}/{'n' * 200}"),
        ],
        {"L" * 300: b"l\n", f"{deep}/{'n' * 200}": b"n\n"},
    )
    bad, latin = "bad-\udcff\udcfe.txt", "latin1-caf\udce9.txt"
    _tar(
        scratch / "hostile-nonutf8.tar",
        [_member(bad), _member(latin)],
        {bad: b"b\n", latin: b"c\n"},
    )
    owned = _member("owned", mode=0o640)
    owned.uid, owned.gid, owned.uname, owned.gname = 65534, 65534, "nobody1", "nogroup1"
    _tar(
        scratch / "hostile-modes.tar",
        [
            _member("setuid", mode=0o4755),
            _member("setgid", mode=0o2755),
            _member("sticky/", tarfile.DIRTYPE, 0o1777),
            owned,
            _member("noperm", mode=0),
        ],
        {"setuid": b"#!/bin/sh\n", "setgid": b"g\n", "owned": b"o\n", "noperm": b"0\n"},
    )
    files = [_member("m/", tarfile.DIRTYPE, 0o755)] + [
        _member(f"m/f{i:03d}.bin") for i in range(40)
    ]
    _tar(
        scratch / "trunc-whole.tar",
        files,
        {f"m/f{i:03d}.bin": bytes([i]) * 3000 for i in range(40)},
    )
    whole = (scratch / "trunc-whole.tar").read_bytes()
    # m/ and f000-f024 take 512 + 25 * (512 + 3072) bytes; cut 1000 bytes into f025's content
    (scratch / "trunc.tar").write_bytes(whole[: 512 + 25 * 3584 + 512 + 1000])
    (scratch / "garbage.tar").write_bytes(b"this is not a tar archive at all\n" * 64)
    tenk = [_member(f"d{i:03d}/", tarfile.DIRTYPE, 0o755) for i in range(100)]
    tenk += [_member(f"d{i // 100:03d}/f{i:05d}.txt") for i in range(10000)]
    _tar(
        scratch / "tenk.tar",
        tenk,
        {f"d{i // 100:03d}/f{i:05d}.txt": b"%05d\n" % i for i in range(10000)},
    )


def m_inputs(fake: FakeStratum0, scratch: Path) -> None:
    """The source tree m_ingest tars up (step 1's note), and ref.local's content before it
    (step 34 lists it: files and a directory of graft leftovers from n_graft_publish, whose
    rows keep the catalog below the defragmentation threshold when ``todel`` goes)."""
    fake.check_run("transaction", "ref.local")
    union = fake.union_dir("ref.local")
    for name in ("big-normal.bin", "small.txt", "l1.txt"):
        (union / name).write_bytes(name.encode() + b"\n")
    (union / "g").mkdir()
    for index in range(14):
        (union / "g" / f"graft{index:02d}.bin").write_bytes(b"%d\n" % index)
    fake.check_run("publish", "ref.local")
    src = scratch / "m" / "src"
    (src / "pkg" / "bin").mkdir(parents=True)
    (src / "pkg" / "share").mkdir()
    (src / "pkg" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (src / "pkg" / "bin" / "tool").chmod(0o755)
    (src / "pkg" / "share" / "data.txt").write_text("data\n")
    (src / "pkg" / "tool-link").symlink_to("bin/tool")
    (src / "top.txt").write_text("top\n")


# What a transcript's steps need beyond fresh repositories: its input files (in the
# replay's scratch directory), the repository's earlier content.
INPUTS: dict[str, Callable[[FakeStratum0, Path], None]] = {
    "m2_ingest": m2_inputs,
    "m_ingest": m_inputs,
}

# Transcripts whose shell steps that only look at the repository are evaluated against
# the client's view of the fake (its catalog), and compared in full.
CLIENT_VIEW_TRANSCRIPTS = {"m2_ingest"}

# find quotes names as in a UTF-8 locale: between U+2018 and U+2019
QUOTED = "\u2018{}\u2019"
FIND_PRINTF = "'%M %U:%G %s %p -> %l\\n'"
NAME_MAX = 255


def cat_v(text: str) -> str:
    """``cat -v``: bytes above 127 as ``M-…``, control characters as ``^…``."""
    out: list[str] = []
    for raw in text.encode(errors="surrogateescape"):
        prefix, byte = ("M-", raw - 128) if raw > 127 else ("", raw)
        if byte == 127:
            out.append(prefix + "^?")
        elif byte < 32 and byte != 10:
            out.append(prefix + "^" + chr(byte + 64))
        else:
            out.append(prefix + chr(byte))
    return "".join(out)


def mode_string(kind: str, mode: int) -> str:
    """``find -printf %M``."""
    letter = {"dir": "d", "symlink": "l", "fifo": "p", "socket": "s", "chardev": "c"}
    chars = [letter.get(kind, "b" if kind == "blockdev" else "-")]
    for shift, special, char in ((6, 0o4000, "s"), (3, 0o2000, "s"), (0, 0o1000, "t")):
        bits = (mode >> shift) & 7
        chars += ["r" if bits & 4 else "-", "w" if bits & 2 else "-"]
        execute = bits & 1
        if mode & special:
            chars.append(char if execute else char.upper())
        else:
            chars.append("x" if execute else "-")
    return "".join(chars)


class ClientView:
    """Runs the shell steps that only read the repository against the fake's catalog, as a
    client mount shows it: ``find DIR -printf '%M %U:%G %s %p -> %l\\n' | sort -k4``
    (optionally ``| cat -v`` / ``| head -N``), ``find DIR -type f | wc -l``, ``cat FILE``,
    ``cvmfs_server … [< FILE]`` and ``echo NAME=$?``, joined by ``;``. Anything else is
    not handled (``run`` returns None) and runs as a plain shell step.
    """

    def __init__(self, replayer: Replayer) -> None:
        self.replayer = replayer
        self.fake = replayer.fake
        self.status = 0

    def run(self, script: str) -> tuple[int, str, str] | None:
        """(exit code, stdout, stderr) of ``script``, or None when it is not handled."""
        stdout: list[str] = []
        stderr: list[str] = []
        for part in script.split("; "):
            done = self.part(part.strip())
            if done is None:
                return None
            self.status, out, err = done
            stdout.append(out)
            stderr.append(err)
        return self.status, "".join(stdout), "".join(stderr)

    def part(self, command: str) -> tuple[int, str, str] | None:
        if any(operator in command for operator in ("&&", "||", " > ", " >> ")):
            return None
        segments = [shlex.split(segment) for segment in command.split(" | ")]
        head = segments[0]
        if head[:1] == ["echo"] and len(head) == 2 and head[1].endswith("=$?"):
            return 0, head[1].replace("$?", str(self.status)) + "\n", ""
        if head[:1] == ["cvmfs_server"] and len(segments) == 1:
            return self.server(head[1:])
        if head[:1] == ["cat"] and len(head) == 2 and len(segments) == 1:
            repo, rel = self.locate(head[1])
            try:
                return 0, self.fake.read_file(repo, rel).decode(errors="surrogateescape"), ""
            except OSError:
                return None
        if head[:1] == ["find"]:
            return self.find(command, segments)
        return None

    def server(self, args: list[str]) -> tuple[int, str, str]:
        stdin = b""
        if len(args) >= 2 and args[-2] == "<":
            stdin = Path(self.replayer.path(args[-1])).read_bytes()
            args = args[:-2]
        result = self.fake.run(*args, stdin=stdin, cwd=self.replayer.scratch)
        return result.returncode, result.stdout, result.stderr

    @staticmethod
    def locate(path: str) -> tuple[str, str]:
        parts = path.split("/")
        return parts[2], "/".join(parts[3:])

    def find(self, command: str, segments: list[list[str]]) -> tuple[int, str, str] | None:
        head = segments[0]
        quiet = "2>/dev/null" in head
        head = [word for word in head if word != "2>/dev/null"]
        top = head[1]
        if not top.startswith("/cvmfs/"):
            return None
        if head[2:] == ["-type", "f"]:
            files_only, printf = True, False
        elif head[2:] == ["-printf", "%M %U:%G %s %p -> %l\\n"] and FIND_PRINTF in command:
            files_only, printf = False, True
        else:
            return None
        lines, errors = self.walk(top, files_only=files_only, printf=printf)
        for segment in segments[1:]:
            words = [word for word in segment if word != "2>&1"]
            if words == ["sort", "-k4"]:
                lines.sort(key=lambda line: line.split(" ", 3)[3].encode(errors="surrogateescape"))
            elif words == ["cat", "-v"]:
                lines = [cat_v(line) for line in lines]
            elif len(words) == 2 and words[0] == "head" and words[1].startswith("-"):
                lines = lines[: int(words[1][1:])]
            elif words == ["wc", "-l"]:
                lines = [str(len(lines))]
            else:
                return None
        return 0, "".join(line + "\n" for line in lines), "" if quiet else errors

    def walk(self, top: str, *, files_only: bool, printf: bool) -> tuple[list[str], str]:
        repo, rel = self.locate(top)
        entries = self.fake.catalog(repo).entries
        start = "/" + rel if rel else "/"
        if start not in entries:
            return [], f"find: {QUOTED.format(top)}: No such file or directory\n"
        uid, gid = self.owner(repo)
        lines: list[str] = []
        errors: list[str] = []
        too_long: list[str] = []
        prefix = start.rstrip("/") + "/"
        for path in sorted(entries):
            if path != start and not path.startswith(prefix):
                continue
            if any(path.startswith(p + "/") for p in too_long):
                continue
            shown = f"/cvmfs/{repo}{'' if path == '/' else path}"
            if len(path.rsplit("/", 1)[1].encode(errors="surrogateescape")) > NAME_MAX:
                too_long.append(path)
                errors.append(f"find: {QUOTED.format(shown)}: File name too long\n")
                continue
            entry = entries[path]
            if files_only:
                if entry.kind == "file":
                    lines.append(shown)
                continue
            if printf:
                size = {"dir": 4096, "file": entry.size}.get(entry.kind, 0)
                target = entry.target or "" if entry.kind == "symlink" else ""
                if entry.kind == "symlink":
                    size = len(target.encode(errors="surrogateescape"))
                owner = (
                    "0:0" if (entry.uid, entry.gid) == (uid, gid) else f"{entry.uid}:{entry.gid}"
                )
                lines.append(
                    f"{mode_string(entry.kind, entry.mode)} {owner} {size} {shown} -> {target}"
                )
        return lines, "".join(errors)

    def owner(self, repo: str) -> tuple[int, int]:
        """uid and gid of the repository's owner (root in the recordings: shown as 0:0)."""
        user = self.fake.config(repo).get("CVMFS_USER", "root")
        try:
            record = pwd.getpwnam(user)
        except KeyError:
            return os.getuid(), os.getgid()
        return record.pw_uid, record.pw_gid


@pytest.fixture(scope="module")
def session_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[str]]]:
    """Replay the first recording session as one chain; differences per transcript."""
    root = tmp_path_factory.mktemp("session-one")
    fake = FakeStratum0(root / "root")
    replayer = Replayer(fake, root)
    results: dict[str, list[str]] = {}
    try:
        for name in SESSION_ONE:
            before = len(replayer.problems)
            replayer.replay(name)
            results[name] = replayer.problems[before:]
    finally:
        replayer.close()
    results["<compared>"] = [str(replayer.compared.get(name, 0)) for name in SESSION_ONE]
    yield results


@pytest.mark.parametrize("name", SESSION_ONE)
def test_session_one_transcript_replays(session_one: dict[str, list[str]], name: str) -> None:
    """Each transcript of the first session replays with the recorded codes, texts, states."""
    assert session_one[name] == [], "\n\n".join(session_one[name])
    compared = int(session_one["<compared>"][SESSION_ONE.index(name)])
    assert compared == expected_comparisons(name)


def expected_comparisons(name: str) -> int:
    """How many cvmfs_server steps of a transcript the replay runs and compares."""
    count = 0
    for step in load(name):
        argv = step["argv"]
        key = (name, int(step["step"]))
        if not argv or key in NOT_RUN or key == ("b_double_transaction", 4):
            continue
        if argv[0] == "cvmfs_server" or (argv[0] == "faketime" and "cvmfs_server" in argv):
            count += 1
    return count


@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_standalone_transcript_replays(tmp_path: Path, name: str) -> None:
    """The later transcripts that need only fresh repositories replay as recorded."""
    fake = FakeStratum0(tmp_path / "root")
    for repo in STANDALONE[name]:
        fake.mkfs(repo, gc=repo.startswith("refgc"), stratum0_url=f"http://localhost/cvmfs/{repo}")
    prepare = INPUTS.get(name)
    if prepare is not None:
        prepare(fake, tmp_path)
    # the S3 configuration k_s3_cycle's mkfs is given (step 1 shows it, keys redacted)
    (fake.config_dir / "refs3.local.s3.conf").write_text(
        "CVMFS_S3_HOST=127.0.0.1\nCVMFS_S3_PORT=9001\nCVMFS_S3_BUCKET=refs3\n"
    )
    replayer = Replayer(fake, tmp_path)
    try:
        replayer.replay(name)
    finally:
        replayer.close()
    assert replayer.problems == [], "\n\n".join(replayer.problems)
    assert replayer.compared.get(name, 0) == expected_comparisons(name)


def test_every_recorded_cvmfs_server_step_is_covered() -> None:
    """Each recorded cvmfs_server step is replayed, scripted below or listed as not modelled."""
    replayed = set(SESSION_ONE) | set(STANDALONE)
    scripted = {"i_check", "j_s3_publish_failure", "n_graft_publish"}
    not_modelled = {
        "n2_graft_publish_s3": "object ACLs of a real S3 bucket are not modelled",
        "p_gateway_basic": "the repository gateway and its leases are not modelled yet",
        "p_gateway_conflict": "hierarchical lease conflicts are not modelled yet",
        "p_gateway_down": "a stopped gateway is not modelled yet",
        "p_gateway_lease_expiry": "lease expiry at the gateway is not modelled yet",
        "p_gateway_maintenance": "maintenance commands on a gateway publisher are not modelled yet",
    }
    names = {p.stem for p in TRANSCRIPTS.glob("*.jsonl")}
    assert names == replayed | scripted | set(not_modelled)


# -- scripted replays ------------------------------------------------------------------------


def sha1(data: bytes) -> str:
    """Hex SHA-1."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def text_input(size: int) -> bytes:
    """The recorder's `text` generator."""
    lines = b"".join(
        b"export PATH=/cvmfs/software/bin:$PATH  # %d\n" % i for i in range(size // 40 + 1)
    )
    return lines[:size]


def randbytes(seed: int, size: int) -> bytes:
    """The recorder's `random` generator."""
    return random.Random(seed).randbytes(size)


def test_i_check_scripted(tmp_path: Path) -> None:
    """i_check: missing/corrupted object, missing chunk and root catalog, as recorded."""
    fake = FakeStratum0(tmp_path / "root")
    fake.mkfs("ref.local")
    fake.set_config("ref.local", "CVMFS_AVG_CHUNK_SIZE", "8055576")
    fake.check_run("transaction", "ref.local")
    union = fake.union_dir("ref.local")
    (union / "small.txt").write_text("hello\n")
    (union / "big-normal.bin").write_bytes(randbytes(7, 20_000_000))
    fake.check_run("publish", "ref.local")
    leftovers = {
        "1e59d19da8423e99d9bb5ef19943ec20fb1f5f72": zlib.compress(randbytes(1004, 200000), 6),
        "a3b861d0dc513b4cc15d744d3babb9dd9049842e": zlib.compress(randbytes(1002, 100000), 6),
    }
    for name, payload in leftovers.items():
        fake.put_object("ref.local", name, payload)
    storage = fake.storage_dir("ref.local")
    result = fake.run("check", "-i", "ref.local")  # i 2
    assert result.returncode == 1
    assert result.stderr == (
        f"mismatch of file name and content hash | at: {storage}/data/1e/"
        "59d19da8423e99d9bb5ef19943ec20fb1f5f72\n"
        f"mismatch of file name and content hash | at: {storage}/data/a3/"
        "b861d0dc513b4cc15d744d3babb9dd9049842e\nFAIL!\n"
    )
    for name in leftovers:  # i 3, 4
        fake.object_path("ref.local", name).unlink()
    assert fake.run("check", "-i", "ref.local").returncode == 0
    small = "5798f7f4ca7585d850eea64610a1f73d8f8de7a3"  # i 5-8
    path = fake.object_path("ref.local", small)
    saved = path.read_bytes()
    path.unlink()
    result = fake.run("check", "ref.local")
    assert result.stderr == (
        f"data chunk {small} (/small.txt) missing\nCATALOG PROBLEMS OR OTHER ERRORS FOUND\n"
    )
    assert fake.run("check", "-c", "ref.local").returncode == 0
    with pytest.raises(OSError, match="cannot be fetched") as info:
        fake.read_file("ref.local", "small.txt")
    assert info.value.errno == errno.EIO
    path.write_bytes(b"garbage")  # i 9-11
    assert fake.run("check", "ref.local").returncode == 0
    result = fake.run("check", "-i", "ref.local")
    assert result.stderr == f"mismatch of file name and content hash | at: {path}\nFAIL!\n"
    path.write_bytes(saved)  # i 12-14
    first = fake.published_tree("ref.local")["big-normal.bin"].chunks[0]
    chunk = fake.object_path("ref.local", first.hash + "P")
    chunk_bytes = chunk.read_bytes()
    chunk.unlink()
    result = fake.run("check", "ref.local")
    assert result.stderr == (
        f"partial data chunk {first.hash}P (/big-normal.bin -> offset: 0 | size: 8055576) "
        "missing\nCATALOG PROBLEMS OR OTHER ERRORS FOUND\n"
    )
    chunk.write_bytes(chunk_bytes)  # i 15-19
    root_hash = fake.root_hash("ref.local")
    catalog = fake.object_path("ref.local", root_hash + "C")
    catalog_bytes = catalog.read_bytes()
    catalog.unlink()
    result = fake.run("check", "ref.local")
    assert result.returncode == 1
    assert result.stderr.startswith(f"failed to download object {root_hash} (9)\n")
    catalog.write_bytes(catalog_bytes)
    assert fake.run("check", "ref.local").stdout.endswith("no problems found\n")
    fake.check_run("transaction", "ref.local")  # i 20-22
    assert fake.run("check", "ref.local").returncode == 0
    assert fake.run("abort", "-f", "ref.local").returncode == 0
    result = fake.run("check", "nosuch.local")  # i 23
    assert (result.returncode, result.stderr) == (1, "The repository nosuch.local does not exist\n")


def test_j_s3_publish_failure_scripted(tmp_path: Path) -> None:
    """j_s3_publish_failure: every failure point exits 1 and a later publish completes it."""
    fake = FakeStratum0(tmp_path / "root")
    s3conf = tmp_path / "refs3.local.s3.conf"
    s3conf.write_text("CVMFS_S3_HOST=127.0.0.1\nCVMFS_S3_PORT=9001\nCVMFS_S3_BUCKET=refs3\n")
    fake.mkfs("refs3.local", gc=True, s3_config=s3conf, stratum0_url="http://127.0.0.1:9001/refs3")
    stratum0 = "http://127.0.0.1:9001/refs3/refs3.local"
    union = fake.union_dir("refs3.local")
    spool = fake.spool_dir("refs3.local")
    fake.check_run("transaction", "refs3.local")  # A: j 2-9
    (union / "a.txt").write_text("A: written while S3 up\n")
    fake.inject_fault("storage", "unreachable")
    result = fake.run("publish", "-m", "publish while S3 down", "refs3.local")
    assert (result.returncode, result.stdout) == (1, f"Repository unavailable under {stratum0}\n")
    assert "refs3.local (stratum0 / S3 - in transaction - whitelist unreachable)  \n" in (
        fake.run("list").stdout
    )
    fake.clear_faults()
    assert fake.run("publish", "-m", "publish after S3 is back", "refs3.local").returncode == 0
    assert fake.read_file("refs3.local", "a.txt") == b"A: written while S3 up\n"
    fake.check_run("transaction", "refs3.local")  # B: j 13-21, endpoint gone while signing
    (union / "b.txt").write_text("B\n")
    fake.inject_fault("publish", "fail", at="signing", times=1)
    result = fake.run("publish", "-m", "S3 dies mid-publish", "refs3.local")
    assert result.returncode == 1
    assert result.stderr == (
        f"HTTP transfer error 7 (HTTP code -1): {stratum0}/.cvmfsreflog\n"
        "failed loading reflog (3 - network failure)\nreflog missing\nSigning failed\n"
    )
    assert fake.in_transaction("refs3.local")
    assert (
        fake.run("publish", "-m", "retry after mid-publish failure", "refs3.local").returncode == 0
    )
    fake.check_run("transaction", "refs3.local")  # B2: j 25-34, endpoint gone during upload
    (union / "b2-big.bin").write_bytes(os.urandom(300_000))
    (union / "b2-small.bin").write_bytes(b"small")
    fake.inject_fault("publish", "fail", at="upload", times=1)
    result = fake.run("publish", "-m", "S3 dies during upload", "refs3.local")
    assert result.returncode == 1
    assert result.stdout.endswith("Waiting for upload of files before committing...\n")
    assert re.match(
        r"Upload job for 'refs3\.local/data/[0-9a-f]{2}/[0-9a-f]{38}' failed\. \(error code: 5 - "
        r"S3: host connection problem\)\n",
        result.stderr,
    )
    assert "-J S3 dies during upload -f overlayfs -p -l 4194304" in result.stderr
    leftovers = [name for name in os.listdir(spool) if name.startswith("tmp.")]
    assert leftovers, "failed S3 publishes leave staged tmp.XXXXXX files (j 57)"
    assert fake.run("publish", "-m", "retry B2", "refs3.local").returncode == 0
    assert sorted(n for n in os.listdir(spool) if n.startswith("tmp.")) == sorted(leftovers)
    fake.inject_fault("storage", "unreachable")  # D: j 35-41
    result = fake.run("transaction", "refs3.local")
    assert (result.returncode, result.stderr) == (
        5,
        "cannot load whitelist [failed to download whitelist]\n",
    )
    result = fake.run("abort", "-f", "refs3.local")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "(unexpected termination) cannot load whitelist [failed to download whitelist]\n"
    )
    assert "refs3.local (stratum0 / S3 - whitelist unreachable)  \n" in fake.run("list").stdout
    fake.clear_faults()
    assert fake.run("list").stdout == "refs3.local (stratum0 / S3)  \n"
    assert fake.run("check", "refs3.local").returncode == 0


def test_n_graft_publish_scripted(tmp_path: Path) -> None:
    """n_graft_publish: readable and EIO grafts, check messages and gc, with recorded hashes."""
    fake = FakeStratum0(tmp_path / "root")
    fake.mkfs("ref.local")
    mib = 1048576
    inputs = {
        "a_none.bin": randbytes(1001, 100000),
        "b_none_zobj.bin": randbytes(1002, 100000),
        "c_zlib_text.txt": text_input(200001),
        "d_zlib_rand_full.bin": randbytes(1004, 200000),
        "e_zlib_rand_prefix.bin": randbytes(1005, 200000),
        "f_none_chunked.bin": randbytes(1006, 2621440),
        "g_none_chunked_noP.bin": randbytes(1007, 2621440),
        "h_zlib_chunked_slices.txt": text_input(3145729),
        "i_zlib_chunked_indep.txt": text_input(3145730),
        "j_missing_object.bin": randbytes(1010, 50000),
        "k_no_compression_line.bin": randbytes(1011, 60000),
        "l_none_chunked_bulk.bin": randbytes(1012, 2097157),
        "m_placeholder_nonempty.bin": randbytes(1013, 30000),
        "n_rmd160.bin": randbytes(1014, 40000),
    }
    data = inputs
    assert sha1(data["a_none.bin"]) == "50929f564bc4d45cc13e7fc0deb3d1c74e4f2b64"
    assert sha1(data["j_missing_object.bin"]) == "07ed0f80662323f302dc716720f84d615bda77f9"
    assert sha1(data["l_none_chunked_bulk.bin"]) == "0f6f86338232acf780e75370d7a578cde91c81e3"

    def slices(blob: bytes, step: int) -> list[tuple[int, bytes]]:
        return [(o, blob[o : o + step]) for o in range(0, len(blob), step)]

    put = fake.put_object
    grafts: dict[str, dict[str, Any]] = {}
    a = data["a_none.bin"]  # n 2-3
    put("ref.local", sha1(a), a)
    grafts["a_none.bin"] = {"checksum": sha1(a)}
    b = data["b_none_zobj.bin"]  # n 4-5: compression=none but object compressed
    put("ref.local", sha1(b), zlib.compress(b, 6))
    grafts["b_none_zobj.bin"] = {"checksum": sha1(b)}
    c_stream = zlib.compress(data["c_zlib_text.txt"], 6)  # n 6-7
    assert sha1(c_stream) == "3153a04da238d13209dc3637f728872d1e4e4f2f"
    put("ref.local", sha1(c_stream), c_stream)
    grafts["c_zlib_text.txt"] = {"checksum": sha1(c_stream), "compression": "zlib"}
    d_stream = zlib.compress(data["d_zlib_rand_full.bin"], 6)  # n 8-9: full stream, prefix hash
    assert sha1(d_stream[:196610]) == "1e59d19da8423e99d9bb5ef19943ec20fb1f5f72"
    put("ref.local", sha1(d_stream[:196610]), d_stream)
    grafts["d_zlib_rand_full.bin"] = {"checksum": sha1(d_stream[:196610]), "compression": "zlib"}
    e_prefix = zlib.compress(data["e_zlib_rand_prefix.bin"], 6)[:196610]  # n 10-11
    assert sha1(e_prefix) == "8088738fcc2439cd59da901205ebfa2300c91207"
    put("ref.local", sha1(e_prefix), e_prefix)
    grafts["e_zlib_rand_prefix.bin"] = {"checksum": sha1(e_prefix), "compression": "zlib"}
    f_chunks = [(o, sha1(piece)) for o, piece in slices(data["f_none_chunked.bin"], mib)]
    for (_, digest), (_, piece) in zip(
        f_chunks, slices(data["f_none_chunked.bin"], mib), strict=True
    ):
        put("ref.local", digest + "P", piece)  # n 12-15
    grafts["f_none_chunked.bin"] = {"checksum": "0" * 40, "chunks": f_chunks}
    g_pieces = slices(data["g_none_chunked_noP.bin"], mib)  # n 16-19: chunks without P
    g_chunks = [(o, sha1(piece)) for o, piece in g_pieces]
    for (_, digest), (_, piece) in zip(g_chunks, g_pieces, strict=True):
        put("ref.local", digest, piece)
    grafts["g_none_chunked_noP.bin"] = {"checksum": "0" * 40, "chunks": g_chunks}
    h_stream = zlib.compress(data["h_zlib_chunked_slices.txt"], 6)  # n 20-24
    h_cuts = [0, 42939, 107046, 166181, 171545]
    h_chunks = []
    for index, (start, end) in enumerate(itertools.pairwise(h_cuts)):
        piece = h_stream[start:end]
        put("ref.local", sha1(piece) + "P", piece)
        h_chunks.append((index * mib, sha1(piece)))
    assert h_chunks[0][1] == "dadd9bfc349e4e1ab47a287e6672dae7640bb9b3"
    grafts["h_zlib_chunked_slices.txt"] = {
        "checksum": "0" * 40,
        "compression": "zlib",
        "chunks": h_chunks,
    }
    i_chunks = []  # n 25-30: each chunk compressed on its own
    for offset, piece in slices(data["i_zlib_chunked_indep.txt"], mib):
        stream = zlib.compress(piece, 6)
        put("ref.local", sha1(stream) + "P", stream)
        i_chunks.append((offset, sha1(stream)))
    assert i_chunks[0][1] == "3a02fa47d799c57dc98dc38d191a9c71ff5714ae"
    grafts["i_zlib_chunked_indep.txt"] = {
        "checksum": "0" * 40,
        "compression": "zlib",
        "chunks": i_chunks,
    }
    grafts["j_missing_object.bin"] = {"checksum": sha1(data["j_missing_object.bin"])}  # n 31-32
    k = data["k_no_compression_line.bin"]  # n 33-34
    put("ref.local", sha1(k), k)
    grafts["k_no_compression_line.bin"] = {"checksum": sha1(k), "compression": None}
    l_pieces = slices(data["l_none_chunked_bulk.bin"], mib)  # n 35-38
    for _, piece in l_pieces:
        put("ref.local", sha1(piece) + "P", piece)
    grafts["l_none_chunked_bulk.bin"] = {
        "checksum": sha1(data["l_none_chunked_bulk.bin"]),
        "chunks": [(o, sha1(piece)) for o, piece in l_pieces],
    }
    m = data["m_placeholder_nonempty.bin"]  # n 39-40
    put("ref.local", sha1(m), m)
    grafts["m_placeholder_nonempty.bin"] = {"checksum": sha1(m), "placeholder": b"stale"}
    n = data["n_rmd160.bin"]  # n 41-42
    n_name = hashlib.new("ripemd160", n).hexdigest() + "-rmd160"
    assert n_name == "96787c7cf31b82ace83de634c6adc2843e8859da-rmd160"
    put("ref.local", n_name, n)
    grafts["n_rmd160.bin"] = {"checksum": n_name}

    fake.check_run("transaction", "ref.local")  # n 44-47
    for name, spec in grafts.items():
        fake.write_graft(
            "ref.local",
            f"g/{name}",
            size=len(data[name]),
            checksum=spec["checksum"],
            compression=spec.get("compression", "none"),
            chunks=spec.get("chunks"),
            placeholder=spec.get("placeholder", b""),
        )
    (fake.union_dir("ref.local") / "g" / ".cvmfsgraft-o_lone_marker").write_text(
        "size=5\nchecksum=aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d\ncompression=none\n"
    )
    assert fake.run("publish", "-m", "grafts", "ref.local").returncode == 0

    tree = fake.published_tree("ref.local")  # n 48-77
    readable = {
        "a_none.bin",
        "c_zlib_text.txt",
        "f_none_chunked.bin",
        "i_zlib_chunked_indep.txt",
        "l_none_chunked_bulk.bin",
        "m_placeholder_nonempty.bin",
        "n_rmd160.bin",
    }
    for name in data:
        entry = tree[f"g/{name}"]
        assert entry.size == len(data[name]), name
        if name in readable:
            assert entry.content == data[name], name
        else:
            assert entry.error == errno.EIO, name
    assert "g/o_lone_marker" not in tree
    assert not any(".cvmfsgraft-" in path for path in tree)
    assert tree["g/k_no_compression_line.bin"].compression == "zlib"
    assert tree["g/l_none_chunked_bulk.bin"].hash == sha1(data["l_none_chunked_bulk.bin"])
    assert tree["g/f_none_chunked.bin"].hash is None

    result = fake.run("check", "ref.local")  # n 78
    assert result.returncode == 1
    assert sorted(result.stderr.splitlines()) == sorted(
        [
            "data chunk 07ed0f80662323f302dc716720f84d615bda77f9 (/g/j_missing_object.bin) missing",
            "data chunk 0f6f86338232acf780e75370d7a578cde91c81e3 "
            "(/g/l_none_chunked_bulk.bin) missing",
            "partial data chunk ba09ee7d08b13f59c92c31c4a45cccb5a1657a45P "
            "(/g/g_none_chunked_noP.bin -> offset: 0 | size: 1048576) missing",
            "partial data chunk 33ff5ec1812b6d33c2441fec3a71aaa59cec5b20P "
            "(/g/g_none_chunked_noP.bin -> offset: 1048576 | size: 1048576) missing",
            "partial data chunk af2bc73b0aee2c6286668a795cf31bf4421a078aP "
            "(/g/g_none_chunked_noP.bin -> offset: 2097152 | size: 524288) missing",
            "CATALOG PROBLEMS OR OTHER ERRORS FOUND",
        ]
    )
    result = fake.run("check", "-i", "ref.local")  # n 79
    storage = fake.storage_dir("ref.local")
    assert result.stderr == (
        f"mismatch of file name and content hash | at: {storage}/data/1e/"
        "59d19da8423e99d9bb5ef19943ec20fb1f5f72\n"
        f"mismatch of file name and content hash | at: {storage}/data/a3/"
        "b861d0dc513b4cc15d744d3babb9dd9049842e\nFAIL!\n"
    )
    put("ref.local", sha1(data["j_missing_object.bin"]), data["j_missing_object.bin"])  # n 80
    assert fake.read_file("ref.local", "g/j_missing_object.bin") == data["j_missing_object.bin"]
    for _, digest in g_chunks:  # n 81
        fake.object_path("ref.local", digest).rename(fake.object_path("ref.local", digest + "P"))
    assert fake.read_file("ref.local", "g/g_none_chunked_noP.bin") == data["g_none_chunked_noP.bin"]
    put("ref.local", sha1(data["l_none_chunked_bulk.bin"]), data["l_none_chunked_bulk.bin"])
    assert fake.run("check", "ref.local").returncode == 0  # n 100-101

    fake.mkfs("refgc.local", gc=True)  # n 102-128
    gc_data = randbytes(2001, 70000)
    put("refgc.local", sha1(gc_data), gc_data)
    orphan = randbytes(2002, 1000)
    put("refgc.local", sha1(orphan), orphan)
    fake.check_run("transaction", "refgc.local")
    fake.write_graft("refgc.local", "gc_graft.bin", size=len(gc_data), checksum=sha1(gc_data))
    fake.check_run("publish", "-m", "graft for gc", "refgc.local")
    fake.check_run("gc", "-r", "0", "-f", "-l", "refgc.local")
    assert fake.read_file("refgc.local", "gc_graft.bin") == gc_data
    fake.check_run("transaction", "refgc.local")
    (fake.union_dir("refgc.local") / "gc_graft.bin").unlink()
    fake.check_run("publish", "-m", "remove graft", "refgc.local")

    def drop_auto_tags() -> None:
        for tag in list(fake.tags("refgc.local")):
            if tag.startswith("generic"):
                fake.check_run("tag", "-r", tag, "-f", "refgc.local")

    drop_auto_tags()
    fake.check_run("gc", "-r", "0", "-f", "-l", "refgc.local")
    assert fake.object_path("refgc.local", sha1(gc_data)).exists(), "kept by trunk-previous"
    fake.check_run("transaction", "refgc.local")
    (fake.union_dir("refgc.local") / "later.txt").write_text("later\n")
    fake.check_run("publish", "-m", "one more", "refgc.local")
    drop_auto_tags()
    result = fake.run("gc", "-r", "0", "-f", "-l", "refgc.local")
    assert f"Sweep: {sha1(gc_data)}\n" in result.stdout
    assert not fake.object_path("refgc.local", sha1(gc_data)).exists()
    assert fake.object_path("refgc.local", sha1(orphan)).exists()
    assert fake.run("check", "refgc.local").returncode == 0


def test_normalise_keeps_meaning() -> None:
    """The output normalisation only hides run-specific details."""
    text = (
        "Using auto tag 'generic_1-2026-11-29T02:11:34Z'\n"
        "[inspecting catalog] c16e58d630b3e31403a5df79b9f1936f37df87bc at /\n"
        "  --> marking unreferenced objects [Sun, 29 Nov 2026 02:14:14 GMT]\n"
        "other.local (stratum0 / local)  \n"
    )
    assert normalise(text, Path("/x"), {"ref.local"}) == [
        "Using auto tag '<TAG>'",
        "[inspecting catalog] <HASH> at /",
        "  --> marking unreferenced objects [<DATE>]",
        "",
    ]
    assert shlex.split("a 'b c'") == ["a", "b c"]
