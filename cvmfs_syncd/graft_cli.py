"""``cvmfs-syncd graft``: write graft markers the way ``cvmfs_swissknife graft`` does.

Options, defaults, output locations, messages, exit codes and file modes follow
``cvmfs_swissknife graft`` (CernVM-FS 2.12). The computed values come from
:mod:`cvmfs_syncd.cvmfs.graft`, so they differ from that tool only where its results
cannot be read by a client (zlib chunks and incompressible zlib input); docs/graft.md
lists every deliberate difference.

The main command line registers the subcommand with :func:`add_parser` and hands the
raw arguments after ``graft`` to :func:`run_graft` (the namespace carries them in
``graft_argv`` and the callable in ``handler``). Options are parsed here, getopt style
(``-bv``, ``-c1``, the last repetition wins), because their exit codes and messages are
part of the compatibility contract and argparse's are not.
"""

from __future__ import annotations

import argparse
import getopt
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from cvmfs_syncd.cvmfs.graft import DEFAULT_CHUNK_SIZE, MIB, GraftOptions, graft_stream
from cvmfs_syncd.cvmfs.hashing import HASH_SUFFIXES
from cvmfs_syncd.errors import GraftError

PROGRAM: Final = "cvmfs-syncd graft"
SUMMARY: Final = "compute .cvmfsgraft markers for files (cvmfs_swissknife graft compatible)"

USAGE: Final = f"""\
usage: {PROGRAM} -i INPUT [-o OUTPUT] [-Z none|zlib|default] [-c MIB]
                         [-a sha1|rmd160|shake128] [-b] [-v]

Describe a file for grafting into a CernVM-FS repository: its size, compression,
checksum and chunk checksums, as read from a .cvmfsgraft-NAME marker by the publisher.

  -i INPUT   regular file, '-' for standard input, or a directory whose regular files
             are all grafted (required)
  -o OUTPUT  write the marker to DIR/.cvmfsgraft-NAME and an empty placeholder to
             OUTPUT = DIR/NAME, instead of printing the marker; for an existing
             directory OUTPUT, NAME is the input's name (directory inputs are mirrored)
  -Z ALGO    compression of the data objects: none (default), zlib or default (= zlib)
  -c MIB     chunk size in MiB (default {DEFAULT_CHUNK_SIZE // MIB}); 0 never chunks
  -a ALGO    hash algorithm: sha1 (default), rmd160 or shake128
  -b         give chunked files a whole-file checksum instead of the null hash
  -v         name each file grafted, also when writing markers
  -h, --help show this text
"""

_COMPRESSION_NAMES: Final = {"none": "none", "zlib": "zlib", "default": "zlib"}
_STDIN_PLACEHOLDER_MODE: Final = 0o644
_MARKER_MODE: Final = 0o644
_INT64_MAX: Final = (1 << 63) - 1
_C_SPACE: Final = " \t\n\v\f\r"


@dataclass(frozen=True)
class GraftInvocation:
    """A parsed ``graft`` command line.

    ``output`` is empty when the markers go to standard output.
    """

    input_path: str
    output: str
    options: GraftOptions
    verbose: bool


class TextOutput(Protocol):
    """Where messages go: anything with ``write(str)`` (a text stream, ``io.StringIO``)."""

    def write(self, text: str, /) -> object:
        """Write ``text``."""


class _Console:
    """Writes to a text stream; names that its encoding rejects go out as their raw bytes.

    File names need not be valid UTF-8; ``os.fsdecode`` keeps their bytes as surrogates,
    which a strict text stream refuses. They are written to the stream's byte buffer then.
    """

    def __init__(self, stream: TextOutput) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        """Write ``text``, falling back to file-system bytes when it cannot be encoded."""
        try:
            self._stream.write(text)
        except UnicodeEncodeError:
            raw = getattr(self._stream, "buffer", None)
            flush = getattr(self._stream, "flush", None)
            if raw is None or flush is None:
                self._stream.write(
                    text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                )
                return
            flush()
            raw.write(os.fsencode(text))
            raw.flush()


class _Exit(Exception):
    """Ends argument parsing early with an exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def parse_chunk_size(text: str) -> int:
    """Return the chunk size in bytes for a ``-c`` value in MiB.

    Accepts what C's ``strtoll`` reads completely and fully (leading blanks, an optional
    sign, decimal digits) when the value is not negative and fits a signed 64-bit integer.
    The product with 1 MiB wraps at 2**64 like the original's unsigned arithmetic.
    Raises :class:`ValueError` otherwise.
    """
    body = text.lstrip(_C_SPACE)
    digits = body[1:] if body[:1] in ("+", "-") else body
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"not a chunk size in MiB: {text!r}")
    value = int(body)
    if value < 0 or value > _INT64_MAX:
        raise ValueError(f"chunk size out of range: {text!r}")
    return (value * MIB) % (1 << 64)


def parse_graft_arguments(
    argv: list[str], stdout: TextOutput, stderr: TextOutput
) -> GraftInvocation:
    """Parse the arguments after ``graft``; print usage or errors and raise ``_Exit`` on them."""
    try:
        pairs, extra = getopt.gnu_getopt(argv, "i:o:Z:c:a:bvh", ["help"])
    except getopt.GetoptError as error:
        stderr.write(f"{PROGRAM}: {error.msg}\n")
        stdout.write(USAGE)
        raise _Exit(1) from error
    if any(option in ("-h", "--help") for option, _ in pairs):
        stdout.write(USAGE)
        raise _Exit(0)
    if extra:
        stderr.write(f"{PROGRAM}: unexpected argument {extra[0]!r}\n")
        stdout.write(USAGE)
        raise _Exit(1)
    values: dict[str, str] = {}
    for option, value in pairs:
        values[option] = value  # the last repetition wins, as with getopt loops
    if "-i" not in values:
        stderr.write("parameter -i missing\n")
        raise _Exit(1)
    compression_name = values.get("-Z", "none")
    if compression_name not in _COMPRESSION_NAMES:
        stderr.write(
            f"{PROGRAM}: unknown compression algorithm {compression_name!r} "
            "(use none, zlib or default)\n"
        )
        raise _Exit(1)
    chunk_text = values.get("-c")
    chunk_size = DEFAULT_CHUNK_SIZE
    if chunk_text is not None:
        try:
            chunk_size = parse_chunk_size(chunk_text)
        except ValueError:
            stderr.write(f"Unable to parse chunk size: {chunk_text}\n")
            raise _Exit(1) from None
    algorithm = values.get("-a", "sha1")
    if algorithm not in HASH_SUFFIXES:
        stderr.write(
            f"{PROGRAM}: unknown hash algorithm {algorithm!r} (use sha1, rmd160 or shake128)\n"
        )
        raise _Exit(1)
    options = GraftOptions(
        compression=_COMPRESSION_NAMES[compression_name],
        chunk_size=chunk_size,
        algorithm=algorithm,
        bulk_hash="-b" in values,
    )
    return GraftInvocation(values["-i"], values.get("-o", ""), options, "-v" in values)


def _split_path(path: str) -> tuple[str, str]:
    """Split at the last ``/``: ``("dir", "name")``; a bare name lies in ``"."``."""
    slash = path.rfind("/")
    if slash < 0:
        return ".", path
    return path[:slash], path[slash + 1 :]


def _is_directory(path: str) -> bool:
    # Path("") would mean the current directory; an empty name names nothing here.
    return bool(path) and Path(path).is_dir()


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


class _Grafter:
    """Carries out one parsed invocation, writing to the given streams."""

    def __init__(
        self,
        invocation: GraftInvocation,
        stdin: BinaryIO,
        stdout: TextOutput,
        stderr: TextOutput,
        workers: int,
    ) -> None:
        self._invocation = invocation
        self._stdin = stdin
        self._stdout = stdout
        self._stderr = stderr
        self._workers = workers

    def run(self) -> int:
        source = self._invocation.input_path
        output = self._invocation.output
        output_is_dir = bool(output) and _is_directory(output)
        if source == "-":
            if output_is_dir:
                self._stderr.write(f"Output file ({output}): Is a directory\n\n")
                return 1
            return self._graft_one(source, output, output_is_dir=False, from_stdin=True)
        if _is_directory(source):
            if output and not output_is_dir:
                self._stderr.write(
                    f"Input ({source}) is a directory but output ({output}) is not\n\n"
                )
                return 1
            if self._invocation.verbose:
                self._stderr.write(f"Recursing into directory {source}\n\n")
            return self._graft_tree(source, output)
        return self._graft_one(source, output, output_is_dir=output_is_dir, from_stdin=False)

    def _graft_tree(self, root: str, output_root: str) -> int:
        """Graft every regular file below ``root`` in directory order, depth first."""
        status = 0
        pending: list[tuple[str, list[os.DirEntry[str]]]] = []
        listing = self._list_directory(root)
        if listing is None:
            return 1
        pending.append(("", listing))
        while pending:
            relative, entries = pending[-1]
            if not entries:
                pending.pop()
                continue
            entry = entries.pop(0)
            shown = relative or "."
            if entry.is_dir(follow_symlinks=False):
                child = f"{relative}/{entry.name}" if relative else entry.name
                if output_root and not self._mirror_directory(entry, f"{output_root}/{child}"):
                    status = 1
                    continue
                child_listing = self._list_directory(f"{root}/{child}")
                if child_listing is None:
                    status = 1
                    continue
                pending.append((child, child_listing))
            elif entry.is_file(follow_symlinks=False):
                target = f"{output_root}/{shown}/{entry.name}" if output_root else ""
                source = f"{root}/{shown}/{entry.name}"
                if self._graft_one(source, target, output_is_dir=False, from_stdin=False):
                    status = 1
            # Symbolic links, devices, sockets and FIFOs inside a tree are not grafted.
        return status

    def _list_directory(self, path: str) -> list[os.DirEntry[str]] | None:
        try:
            with os.scandir(path) as iterator:
                return list(iterator)
        except OSError as error:
            self._stderr.write(f"Unable to read directory ({path}): {_describe(error)}\n")
            return None

    def _mirror_directory(self, entry: os.DirEntry[str], target: str) -> bool:
        try:
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            Path(target).mkdir(mode=mode)
        except FileExistsError:
            return True
        except OSError as error:
            self._stderr.write(f"Unable to create directory ({target}): {_describe(error)}\n")
            return False
        return True

    def _graft_one(self, source: str, output: str, *, output_is_dir: bool, from_stdin: bool) -> int:
        if output and self._invocation.verbose:
            self._stdout.write(f"Grafting {source} to {output}\n")
        elif not output:
            self._stdout.write(f"Grafting {source}\n")
        if from_stdin:
            return self._graft_opened(self._stdin, _STDIN_PLACEHOLDER_MODE, output)
        try:
            stream = open(source, "rb")  # noqa: SIM115 - closed below; errno text needed
        except OSError as error:
            self._stderr.write(f"Unable to open input file ({source}): {_describe(error)}\n")
            return 1
        with stream:
            mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
            if output_is_dir:
                output = f"{output}/{_split_path(source)[1]}"
            return self._graft_opened(stream, mode, output)

    def _graft_opened(self, stream: BinaryIO, mode: int, output: str) -> int:
        marker_fd = -1
        if output:
            directory, name = _split_path(output)
            marker = f"{directory}/.cvmfsgraft-{name}"
            try:
                # O_TRUNC on an existing marker keeps its mode, as the original does.
                marker_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MARKER_MODE)
            except OSError as error:
                self._stderr.write(f"Unable to open graft file ({marker}): {_describe(error)}\n")
                return 1
        try:
            result = graft_stream(stream, self._invocation.options, workers=self._workers)
        except GraftError as error:
            self._stderr.write(f"{PROGRAM}: {error}\n")
            if marker_fd >= 0:
                os.close(marker_fd)
            return 1
        text = result.text()
        if marker_fd < 0:
            self._stdout.write(text)
            return 0
        with os.fdopen(marker_fd, "wb") as marker_file:
            marker_file.write(text.encode("ascii"))
        try:
            # The placeholder carries the input's permission bits; the umask applies, and
            # an existing placeholder keeps its own mode.
            os.close(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
        except OSError as error:
            self._stderr.write(f"Unable to create placeholder ({output}): {_describe(error)}\n")
            return 1
        return 0


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_graft(
    argv: list[str],
    stdin: BinaryIO,
    stdout: TextOutput,
    stderr: TextOutput,
    *,
    workers: int | None = None,
) -> int:
    """Run ``graft`` with the arguments that follow it; return the exit status.

    ``stdin`` is read for ``-i -``; ``stdout`` receives the markers (without ``-o``) and
    ``Grafting`` lines, ``stderr`` the errors. ``workers`` threads compress chunks (default:
    the number of CPUs, at most 4). Exit status 0 on success, 1 on any error; nothing is
    raised for bad input or options.
    """
    out, err = _Console(stdout), _Console(stderr)
    try:
        invocation = parse_graft_arguments(argv, out, err)
    except _Exit as done:
        return done.status
    chosen = workers if workers is not None else _default_workers()
    return _Grafter(invocation, stdin, out, err, chosen).run()


def run_from_namespace(namespace: argparse.Namespace) -> int:
    """Run ``graft`` for a namespace produced by the parser :func:`add_parser` registers."""
    return run_graft(list(namespace.graft_argv), sys.stdin.buffer, sys.stdout, sys.stderr)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``graft`` on ``subparsers``.

    The subparser collects every argument after ``graft`` verbatim into ``graft_argv``
    (its own ``-h`` included) and sets ``handler`` to :func:`run_from_namespace`.
    """
    parser = subparsers.add_parser(
        "graft",
        help=SUMMARY,
        description=SUMMARY,
        usage=USAGE.split("\n\n", 1)[0].removeprefix("usage: "),
        add_help=False,
        # No prefix character can occur in a command-line argument, so argparse treats
        # every argument as a positional one and leaves option parsing to run_graft.
        prefix_chars="\0",
    )
    parser.add_argument("graft_argv", nargs=argparse.REMAINDER, metavar="OPTION", help="see --help")
    parser.set_defaults(handler=run_from_namespace)


def main() -> int:
    """Entry point of ``python -m cvmfs_syncd.graft_cli``."""
    return run_graft(sys.argv[1:], sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
