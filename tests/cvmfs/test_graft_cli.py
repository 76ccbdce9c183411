"""``cvmfs-syncd graft`` against the recorded usage vectors, plus its own command-line rules.

Every usage vector is reproduced with its placeholders substituted. Where the project
deliberately differs from ``cvmfs_swissknife graft`` (unknown ``-a``/``-Z`` values exit 1
instead of aborting, our own usage text, pipes read to their end, chunked zlib values by
the per-chunk rule) the test states the behaviour we promise instead.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from cvmfs_syncd.graft_cli import USAGE, add_parser, parse_chunk_size, run_from_namespace, run_graft
from tests.cvmfs.test_graft_vectors import (
    expected_graft_text,
    generate_input,
    graft_fields,
    load_vectors,
)
from tests.support import wait_for

USAGE_VECTORS = {vector["id"]: vector for vector in load_vectors("usage")}
Vector = dict[str, Any]
Result = tuple[int, str, str]

BAD_ALGORITHM = {"u12", "u13", "u14", "u15", "u16", "u48"}
BAD_COMPRESSION = {"u23", "u24", "u25"}
RULE_VECTORS = {"u29", "u51"}
TREE_VECTORS = {"u08", "u09", "u10", "u11", "u37"}
STDIN_INPUTS = {
    "u26": {"kind": "random", "seed": 99, "size": 40000},
    "u27": {"kind": "random", "seed": 99, "size": 40000},
    "u28": {"kind": "random", "seed": 99, "size": 40000},
    "u29": {"kind": "random", "seed": 3, "size": 3145729},
    "u30": {"kind": "random", "seed": 3, "size": 3145729},
}
ABCDEF_SHA1 = hashlib.sha1(b"abcdef", usedforsecurity=False).hexdigest()


def run_cli(argv: list[str], stdin: BinaryIO | None = None) -> Result:
    """Run ``graft`` in-process; return exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run_graft(argv, stdin if stdin is not None else io.BytesIO(), stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def run_cli_as_nobody(argv: list[str]) -> Result:
    """Run ``graft`` in a forked child that switched to user ``nobody`` (needs root)."""
    user = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 70
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.write(write_end, json.dumps(run_cli(argv)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    code, stdout, stderr = json.loads(payload)
    return int(code), str(stdout), str(stderr)


def bytes_in_pipe(fd: int) -> int:
    """Return how many written bytes a pipe or FIFO holds that nobody has read yet."""
    result = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    count: int = struct.unpack("i", result)[0]
    return count


def write_with_pause(fd: int) -> None:
    """Write ``abc``, wait until the reader consumed it (a short read), write ``def``, close."""
    try:
        os.write(fd, b"abc")
        wait_for(lambda: bytes_in_pipe(fd) == 0, timeout=30, what="the reader to drain 'abc'")
        os.write(fd, b"def")
    finally:
        os.close(fd)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Describe every entry below ``root`` the way the usage vectors' ``files_after`` do."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        mode = f"{stat.S_IMODE(info.st_mode):04o}"
        relative = path.relative_to(root).as_posix()
        if stat.S_ISDIR(info.st_mode):
            entries[relative] = {"type": "dir", "mode": mode}
        elif stat.S_ISREG(info.st_mode):
            entry: dict[str, Any] = {"type": "file", "mode": mode, "size": info.st_size}
            if path.name.startswith(".cvmfsgraft-"):
                entry["text"] = path.read_text(encoding="ascii")
            entries[relative] = entry
        else:
            entries[relative] = {"type": "other", "mode": mode}
    return entries


@dataclass
class Scene:
    """The file system a usage vector ran in, rebuilt under a scratch directory."""

    root: Path
    outdir: Path
    placeholders: dict[str, str] = field(default_factory=dict)

    def substitute(self, text: str) -> str:
        """Replace the vector's placeholders (``<in>``, ``<outdir>``, …) by real paths."""
        for placeholder, value in self.placeholders.items():
            text = text.replace(placeholder, value)
        return text


def build_tree(tree: Path) -> None:
    """Create the input tree of u08-u11/u37, with the recorded modes."""
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"hello\n")
    (tree / "sub" / "b.bin").write_bytes(random_bytes(5, 20000))
    (tree / "sub" / "deeper" / "c.txt").write_bytes(b"")
    (tree / "link-to-a").symlink_to("a.txt")
    for relative, mode in (
        ("a.txt", 0o644),
        ("sub", 0o750),
        ("sub/b.bin", 0o755),
        ("sub/deeper", 0o755),
        ("sub/deeper/c.txt", 0o600),
    ):
        (tree / relative).chmod(mode)


def random_bytes(seed: int, size: int) -> bytes:
    """Return the ``random`` generator's bytes for ``seed`` and ``size``."""
    return generate_input({"kind": "random", "seed": seed, "size": size})


def build_scene(vector: Vector, root: Path) -> Scene:
    """Create the inputs and existing files a usage vector's ``setup`` describes."""
    outdir = root / "outdir"
    outdir.mkdir()
    scene = Scene(root, outdir, {"<outdir>": str(outdir), "<tmp>": str(root)})
    source = root / "input.bin"
    scene.placeholders["<in>"] = str(source)
    inputs = vector.get("inputs") or {}
    if "<in>" in inputs:
        source.write_bytes(generate_input(inputs["<in>"]["generator"]))
        source.chmod(int(inputs["<in>"]["mode"], 8))
    if vector["id"] in TREE_VECTORS:
        tree = root / "intree"
        build_tree(tree)
        scene.placeholders["<intree>"] = str(tree)
    if vector["id"] == "u11":
        (outdir / "plainfile").write_bytes(b"x")
        (outdir / "plainfile").chmod(0o644)
    if vector["id"] == "u34":
        source.write_bytes(random_bytes(99, 40000))
        source.chmod(0o755)
        (outdir / "f").write_bytes(b"p" * 36)
        (outdir / ".cvmfsgraft-f").write_bytes(b"g" * 200)
        (outdir / "f").chmod(0o600)
        (outdir / ".cvmfsgraft-f").chmod(0o600)
    if vector["id"] == "u45":
        link = root / "link.bin"
        link.symlink_to(source)
        scene.placeholders["<link>"] = str(link)
    if vector["id"] == "u46":
        fifo = root / "fifo"
        os.mkfifo(fifo, 0o640)
        fifo.chmod(0o640)
        scene.placeholders["<fifo>"] = str(fifo)
    return scene


@pytest.fixture
def with_umask() -> Iterator[Callable[[str], None]]:
    """Let a test set the process umask; restore the previous one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(octal: str) -> None:
        os.umask(int(octal, 8))

    try:
        yield set_umask
    finally:
        os.umask(previous)


def start_fifo_writer(fifo: Path) -> threading.Thread:
    """Start a thread that opens ``fifo`` once a reader has, then writes with a pause."""

    def open_for_writing() -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO until the reader has opened the FIFO
            return None

    def writer() -> None:
        fd: int = wait_for(open_for_writing, timeout=30, what="a reader on the FIFO")
        os.set_blocking(fd, True)
        write_with_pause(fd)

    thread = threading.Thread(target=writer, name="fifo-writer")
    thread.start()
    return thread


def run_vector(vector: Vector, scene: Scene, monkeypatch: pytest.MonkeyPatch) -> Result:
    """Run the vector's command line (placeholders substituted) in its cwd and stdin."""
    argv = [scene.substitute(argument) for argument in vector["argv"]]
    assert argv[:2] == ["cvmfs_swissknife", "graft"]
    argv = argv[2:]
    if vector.get("cwd"):
        monkeypatch.chdir(scene.substitute(vector["cwd"]))
    if vector["id"] in STDIN_INPUTS:
        return run_cli(argv, io.BytesIO(generate_input(STDIN_INPUTS[vector["id"]])))
    if vector["id"] == "u46":
        writer = start_fifo_writer(Path(scene.placeholders["<fifo>"]))
        try:
            return run_cli(argv)
        finally:
            writer.join(timeout=60)
    return run_cli(argv)


def check_files(vector: Vector, scene: Scene) -> None:
    """Compare the output directory with the vector's ``files_after``."""
    if vector["files_after"] is None:
        return
    assert vector["files_after_root"] == "<outdir>"
    assert snapshot(scene.outdir) == vector["files_after"]


def sorted_blocks(text: str) -> list[str]:
    """Split ``Grafting …`` output into one block per file, sorted (readdir order varies)."""
    blocks = ["Grafting " + block for block in text.split("Grafting ") if block]
    return sorted(blocks)


GENERIC = sorted(
    set(USAGE_VECTORS)
    - BAD_ALGORITHM
    - BAD_COMPRESSION
    - RULE_VECTORS
    - {"u03", "u06", "u07", "u08", "u37", "u46", "u47"}
)


@pytest.mark.parametrize("vector_id", GENERIC)
def test_usage_vector(
    vector_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_umask: Callable[[str], None],
) -> None:
    """The command exits, prints and leaves files exactly as the recording shows."""
    vector = USAGE_VECTORS[vector_id]
    scene = build_scene(vector, tmp_path)
    with_umask(vector["umask"])
    code, stdout, stderr = run_vector(vector, scene, monkeypatch)
    assert code == vector["exit_code"]
    assert stdout == scene.substitute(vector["stdout"])
    assert stderr == scene.substitute(vector["stderr"])
    check_files(vector, scene)


@pytest.mark.parametrize("vector_id", ["u08", "u37"])
def test_directory_vectors_in_any_readdir_order(
    vector_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_umask: Callable[[str], None],
) -> None:
    """A directory input grafts every regular file below it; only the order may differ."""
    vector = USAGE_VECTORS[vector_id]
    scene = build_scene(vector, tmp_path)
    with_umask(vector["umask"])
    code, stdout, stderr = run_vector(vector, scene, monkeypatch)
    assert code == vector["exit_code"]
    assert stderr == scene.substitute(vector["stderr"])
    if vector_id == "u08":
        assert sorted_blocks(stdout) == sorted_blocks(scene.substitute(vector["stdout"]))
    else:
        expected = scene.substitute(vector["stdout"]).splitlines()
        assert sorted(stdout.splitlines()) == sorted(expected)
    check_files(vector, scene)


@pytest.mark.parametrize("vector_id", ["u06", "u07"])
def test_unreadable_input(vector_id: str, with_umask: Callable[[str], None]) -> None:
    """An input the caller may not read is reported with the recorded message and exit 1."""
    vector = USAGE_VECTORS[vector_id]
    with_umask(vector["umask"])
    # Everything must be reachable by the unprivileged user, unlike pytest's 0700 tmp_path.
    shared = Path(tempfile.mkdtemp(prefix="graft-unreadable-"))
    try:
        shared.chmod(0o755)
        source = shared / "input.bin"
        source.write_bytes(b"secret\n")
        source.chmod(0o600)
        outdir = shared / "outdir"
        outdir.mkdir()
        outdir.chmod(0o777)
        scene = Scene(shared, outdir, {"<in>": str(source), "<outdir>": str(outdir)})
        argv = [scene.substitute(argument) for argument in vector["argv"][2:]]
        if os.geteuid() == 0:
            code, stdout, stderr = run_cli_as_nobody(argv)
        else:
            source.chmod(0)
            code, stdout, stderr = run_cli(argv)
        assert code == vector["exit_code"]
        assert stdout == scene.substitute(vector["stdout"])
        assert stderr == scene.substitute(vector["stderr"])
        check_files(vector, scene)
    finally:
        shutil.rmtree(shared)


def test_unknown_option_prints_our_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown option exits 1 like swissknife, naming it, with our own usage text."""
    vector = USAGE_VECTORS["u03"]
    scene = build_scene(vector, tmp_path)
    code, stdout, stderr = run_vector(vector, scene, monkeypatch)
    assert code == vector["exit_code"] == 1
    assert "-x" in stderr
    assert stdout == USAGE
    assert "cvmfs_swissknife" not in stdout


@pytest.mark.parametrize("vector_id", sorted(BAD_ALGORITHM | BAD_COMPRESSION))
def test_unknown_algorithm_exits_1_instead_of_aborting(
    vector_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown -a/-Z values exit 1 with a message naming the value; nothing is written."""
    vector = USAGE_VECTORS[vector_id]
    assert vector["exit_code"] == -6  # the original aborts (SIGABRT)
    scene = build_scene(vector, tmp_path)
    code, stdout, stderr = run_vector(vector, scene, monkeypatch)
    value = vector["argv"][vector["argv"].index("-a" if vector_id in BAD_ALGORITHM else "-Z") + 1]
    kind = "hash algorithm" if vector_id in BAD_ALGORITHM else "compression algorithm"
    assert code == 1
    assert stdout == ""
    assert stderr == f"cvmfs-syncd graft: unknown {kind} {value!r}" + stderr[stderr.index(" (") :]
    assert snapshot(scene.outdir) == {}


@pytest.mark.parametrize("vector_id", sorted(RULE_VECTORS))
def test_unusable_zlib_results_follow_the_rule(
    vector_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """u29 (chunked) and u51 (incompressible) zlib give the rule's values, recorded layout."""
    vector = USAGE_VECTORS[vector_id]
    scene = build_scene(vector, tmp_path)
    code, stdout, stderr = run_vector(vector, scene, monkeypatch)
    copy = tmp_path / "input-copy.bin"
    generator = STDIN_INPUTS.get(vector_id) or vector["inputs"]["<in>"]["generator"]
    copy.write_bytes(generate_input(generator))
    options = vector["argv"][4:]
    assert vector["argv"][2] == "-i"
    assert (code, stderr) == (0, "")
    assert stdout == scene.substitute(vector["stdout"]).split("\n", 1)[0] + "\n" + (
        expected_graft_text(copy, options)
    )
    ours = graft_fields(stdout.split("\n", 1)[1])
    recorded = graft_fields(vector["stdout"].split("\n", 1)[1])
    assert ours["checksum"] != recorded["checksum"]  # the recorded one is unusable
    for key in ("size", "compression", "chunk_offsets"):
        assert ours.get(key) == recorded.get(key)


def test_fifo_is_read_to_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """u46: a FIFO whose writer pauses is read completely (the original stops at 3 bytes)."""
    vector = USAGE_VECTORS["u46"]
    scene = build_scene(vector, tmp_path)
    code, stdout, stderr = run_vector(vector, scene, monkeypatch)
    assert (code, stdout, stderr) == (0, "", "")
    expected = vector["files_after"]
    expected[".cvmfsgraft-f"]["text"] = f"size=6\nchecksum={ABCDEF_SHA1}\ncompression=none\n"
    expected[".cvmfsgraft-f"]["size"] = len(expected[".cvmfsgraft-f"]["text"])
    assert snapshot(scene.outdir) == expected


def test_stdin_pipe_is_read_to_its_end() -> None:
    """u47: stdin from a pipe whose writer pauses is read completely (size=6, exit 0)."""
    vector = USAGE_VECTORS["u47"]
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=write_with_pause, args=(write_end,), name="pipe-writer")
    writer.start()
    try:
        with os.fdopen(read_end, "rb") as stdin:
            code, stdout, stderr = run_cli(["-i", "-"], stdin)
    finally:
        writer.join(timeout=60)
    assert vector["stdout"].startswith("Grafting -\nsize=3\n")
    assert (code, stderr) == (0, "")
    assert stdout == f"Grafting -\nsize=6\nchecksum={ABCDEF_SHA1}\ncompression=none\n"


def test_every_usage_vector_is_exercised() -> None:
    """Each of the 53 usage vectors is covered by one of the tests above."""
    special = {"u03", "u06", "u07", "u08", "u37", "u46", "u47"}
    covered = set(GENERIC) | special | RULE_VECTORS | BAD_ALGORITHM | BAD_COMPRESSION
    assert covered == set(USAGE_VECTORS)
    assert len(USAGE_VECTORS) == 53


# --------------------------------------------------------------------------- own rules


def test_help_prints_usage_and_exits_0() -> None:
    """``-h`` and ``--help`` print the usage text on stdout and exit 0."""
    for flag in ("-h", "--help"):
        assert run_cli([flag]) == (0, USAGE, "")


def test_stray_argument_is_a_usage_error(tmp_path: Path) -> None:
    """A positional argument besides the options exits 1 and shows the usage."""
    source = tmp_path / "in"
    source.write_bytes(b"x")
    code, stdout, stderr = run_cli(["-i", str(source), "extra"])
    assert (code, stdout) == (1, USAGE)
    assert "extra" in stderr


def test_option_without_value_is_a_usage_error() -> None:
    """An option missing its value exits 1 naming the option."""
    code, stdout, stderr = run_cli(["-i"])
    assert (code, stdout) == (1, USAGE)
    assert "-i" in stderr


def test_grouped_and_attached_options(tmp_path: Path) -> None:
    """getopt forms work: grouped flags (``-bv``) and attached values (``-c1``, ``-Zzlib``)."""
    source = tmp_path / "in"
    source.write_bytes(bytes(3 * 1024 * 1024))
    code, stdout, _ = run_cli(["-bv", "-c1", "-Zzlib", f"-i{source}"])
    assert code == 0
    assert stdout == f"Grafting {source}\n" + expected_graft_text(
        source, ["-b", "-c", "1", "-Z", "zlib"]
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1 << 20),
        ("24", 24 << 20),
        ("+2", 2 << 20),
        ("  3", 3 << 20),
        ("-0", 0),
        (str((1 << 63) - 1), (((1 << 63) - 1) << 20) % (1 << 64)),
    ],
)
def test_chunk_size_accepts_what_strtoll_reads(text: str, expected: int) -> None:
    """``-c`` accepts decimal, signed and blank-prefixed values like the C parser."""
    assert parse_chunk_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "abc", "1.5", "2 ", "0x10", str(1 << 63), "\u0661"])
def test_chunk_size_rejects_other_text(text: str) -> None:
    """``-c`` rejects negative, fractional, trailing-garbage and out-of-range values."""
    with pytest.raises(ValueError, match="chunk size"):
        parse_chunk_size(text)


def test_default_compression_means_zlib(tmp_path: Path) -> None:
    """``-Z default`` writes ``compression=zlib`` and the same checksum as ``-Z zlib``."""
    source = tmp_path / "in"
    source.write_bytes(b"hello world\n" * 1000)
    _, default_out, _ = run_cli(["-i", str(source), "-Z", "default"])
    _, zlib_out, _ = run_cli(["-i", str(source), "-Z", "zlib"])
    assert default_out == zlib_out
    assert "compression=zlib\n" in default_out


def test_tree_skips_fifos_and_reuses_existing_output_directories(tmp_path: Path) -> None:
    """Grafting a tree twice into the same output works; FIFOs and symlinks are skipped."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_bytes(b"data")
    os.mkfifo(tree / "pipe")
    (tree / "link").symlink_to("sub/file")
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):
        code, stdout, stderr = run_cli(["-i", str(tree), "-o", str(out)])
        assert (code, stdout, stderr) == (0, "", "")
    assert sorted(snapshot(out)) == ["sub", "sub/.cvmfsgraft-file", "sub/file"]


def test_undecodable_file_names_are_printed_as_bytes(tmp_path: Path) -> None:
    """A file name that is not UTF-8 is printed byte for byte, even on a strict stream."""
    raw_name = os.fsencode(tmp_path) + b"/caf\xe9.bin"
    with open(raw_name, "wb") as created:
        created.write(b"hello\n")
    buffer = io.BytesIO()
    stdout = io.TextIOWrapper(buffer, encoding="utf-8", errors="strict", write_through=True)
    code = run_graft(["-i", os.fsdecode(raw_name)], io.BytesIO(), stdout, io.StringIO())
    stdout.flush()
    assert code == 0
    assert buffer.getvalue().startswith(b"Grafting " + raw_name + b"\nsize=6\n")


def test_add_parser_hands_all_arguments_to_run_graft() -> None:
    """The registered subparser keeps every argument after ``graft`` verbatim."""
    parser = argparse.ArgumentParser(prog="cvmfs-syncd")
    add_parser(parser.add_subparsers(dest="command"))
    namespace = parser.parse_args(["graft", "-i", "x", "-bv", "--help", "--", "y"])
    assert namespace.graft_argv == ["-i", "x", "-bv", "--help", "--", "y"]
    assert namespace.handler is run_from_namespace


def test_module_runs_as_a_program(tmp_path: Path) -> None:
    """``python -m cvmfs_syncd.graft_cli`` grafts a file and reports missing ``-i`` with 1."""
    source = tmp_path / "in"
    source.write_bytes(b"hello\n")
    module = [sys.executable, "-m", "cvmfs_syncd.graft_cli"]
    done = subprocess.run([*module, "-i", str(source)], capture_output=True, check=False)
    assert done.returncode == 0
    assert done.stdout.decode() == (
        f"Grafting {source}\nsize=6\nchecksum=f572d396fae9206628714fb2ce00f72e94f2258f\n"
        "compression=none\n"
    )
    missing = subprocess.run(module, capture_output=True, check=False)
    assert (missing.returncode, missing.stderr) == (1, b"parameter -i missing\n")
