"""The fed ``ingest`` call: argv, stdin streaming, inactivity timeout, and failed feeds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cvmfs_syncd.cvmfs.feed import Feed
from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.errors import CvmfsCommandError
from tests.cvmfs.test_server import write_stub

# Reads its stdin as a tar stream and reports argv, the members and whether the tar was
# whole; a truncated tar exits 1 with the tool's own message (m2_ingest 51).
TAR_STUB = """\
import io, tarfile
data = sys.stdin.buffer.read()
try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        names = [m.name for m in tar]
        for m in tar.getmembers():
            if m.isfile():
                tar.extractfile(m).read()
except (tarfile.ReadError, EOFError, OSError) as exc:
    print("failed to read data from the tar entry: x (-1)", file=sys.stderr)
    print(" Truncated tar archive", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"argv": args, "names": names, "bytes": len(data)}))
"""


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A plain tar holding ``members`` (name → content)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


@pytest.fixture
def tar_server(tmp_path: Path) -> CvmfsServer:
    """An adapter whose cvmfs_server reads a tar from stdin and reports it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return CvmfsServer(write_stub(tmp_path, TAR_STUB), cwd=str(cwd), kill_grace=0.5)


def test_ingest_streams_the_fed_tar_and_builds_the_argv(tar_server: CvmfsServer) -> None:
    """The tar the feed writes reaches the command whole; argv is ``ingest -t - -b B -c -d P R``."""
    payload = tar_bytes({"pkg/a.txt": b"a" * 200_000, "top.txt": b"top"})

    def feed(stream: Feed) -> None:
        for start in range(0, len(payload), 4096):
            stream.write(payload[start : start + 4096])

    fed = tar_server.ingest(
        "ref.local", base="/sw//stack-1/", feed=feed, deletes=["sw/stack-1/old"]
    )
    assert fed.result.outcome is Outcome.OK, fed.result
    assert fed.feed_error is None
    assert fed.fed_bytes == len(payload)
    report = json.loads(fed.result.stdout)
    assert report["argv"] == [
        "ingest", "-t", "-", "-b", "sw/stack-1", "-c", "-d", "sw/stack-1/old", "ref.local"
    ]  # fmt: skip
    assert report["names"] == ["pkg/a.txt", "top.txt"]
    assert report["bytes"] == len(payload)


def test_ingest_without_catalog_omits_c(tar_server: CvmfsServer) -> None:
    """``catalog=False`` leaves ``-c`` out."""
    payload = tar_bytes({"a": b"1"})
    fed = tar_server.ingest("ref.local", base="b", feed=lambda s: s.write(payload), catalog=False)
    assert json.loads(fed.result.stdout)["argv"] == ["ingest", "-t", "-", "-b", "b", "ref.local"]


def test_a_failing_feed_truncates_the_tar_so_the_command_fails(tar_server: CvmfsServer) -> None:
    """A feed that raises after whole members leaves the tool a truncated archive, not a short
    but complete-looking one, and the error comes back with the result."""
    payload = tar_bytes({"a.txt": b"x" * 1000, "b.txt": b"y" * 1000})
    whole_members = payload[: 512 * 2 + 1024 + 512 * 2 + 1024 + 512]  # headers + data, no end

    def feed(stream: Feed) -> None:
        stream.write(whole_members[:2048])
        raise RuntimeError("archive changed between reads")

    fed = tar_server.ingest("ref.local", base="b", feed=feed)
    assert isinstance(fed.feed_error, RuntimeError)
    assert fed.result.outcome is Outcome.ARCHIVE_UNREADABLE


def test_a_command_that_stops_reading_is_not_a_feed_error(tmp_path: Path) -> None:
    """When the tool exits without reading (an open transaction), the broken pipe is ours to
    swallow: the result carries the tool's outcome and no feed error."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    prefix = write_stub(
        tmp_path,
        'print("CernVM-FS transaction error: another transaction is already open",'
        " file=sys.stderr)\nsys.exit(1)\n",
    )
    server = CvmfsServer(prefix, cwd=str(cwd))

    def feed(stream: Feed) -> None:
        for _ in range(4096):
            stream.write(b"\0" * 65536)

    fed = server.ingest("ref.local", base="b", feed=feed)
    assert fed.result.outcome is Outcome.ALREADY_IN_TRANSACTION
    assert fed.feed_error is None


def test_an_idle_command_is_stopped_after_the_inactivity_bound(tmp_path: Path) -> None:
    """No total limit, but nothing fed and nothing printed for ``inactivity`` seconds ends it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = CvmfsServer(
        write_stub(tmp_path, "threading.Event().wait(60)\n"), cwd=str(cwd), kill_grace=0.5
    )
    fed = server.ingest("ref.local", base="b", feed=lambda _: None, inactivity=0.5)
    assert fed.result.outcome is Outcome.TIMEOUT
    assert fed.result.reason == "idle for more than 0.5 s"


def test_a_command_that_keeps_printing_is_not_idle(tmp_path: Path) -> None:
    """Output counts as progress: a command printing its dots outlives the inactivity bound."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    body = (
        "sys.stdin.buffer.read()\n"
        "for _ in range(12):\n"
        "    print('.', flush=True)\n"
        "    threading.Event().wait(0.1)\n"
    )
    server = CvmfsServer(write_stub(tmp_path, body), cwd=str(cwd), kill_grace=0.5)
    fed = server.ingest("ref.local", base="b", feed=lambda _: None, inactivity=0.4)
    assert fed.result.outcome is Outcome.OK, fed.result
    assert fed.result.duration_s > 0.4


@pytest.mark.parametrize(
    ("base", "deletes"),
    [("a b", ()), ("a/../b", ()), ("", ()), ("a$(x)", ()), ("ok", ("bad name",)), ("ok", ("",))],
)
def test_paths_the_tools_shell_would_split_are_refused(
    tar_server: CvmfsServer, base: str, deletes: tuple[str, ...]
) -> None:
    """``cvmfs_server ingest`` pastes base and deletions unquoted into ``sh -c``."""
    with pytest.raises(CvmfsCommandError):
        tar_server.ingest("ref.local", base=base, feed=lambda _: None, deletes=deletes)
