"""``cvmfs-syncd graft`` against the 840 matrix vectors recorded from ``cvmfs_swissknife graft``.

A vector is compared byte for byte (exit code, marker text and mode, placeholder size and
mode, standard output without ``-o``) when the recorded result is one a client can use:
every ``-Z none`` vector and every unchunked ``-Z zlib`` vector whose checksum covers the
whole level-6 stream. For the others (chunked zlib, incompressible zlib) the expected
marker is computed here from the input by the documented rule (each chunk its own
complete zlib stream), and its size and chunk offsets must still equal the recorded ones.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd.graft_cli import run_graft
from tests.support import needs, reference_dir

REFERENCE_DIR = reference_dir()
VECTORS_FILE = REFERENCE_DIR / "graft" / "vectors.jsonl"
KIB = 1024
MIB = 1024 * 1024

Vector = dict[str, Any]


def load_vectors(category: str) -> list[Vector]:
    """Return the recorded vectors of ``category`` (``matrix`` or ``usage``), or none."""
    if not VECTORS_FILE.exists():
        return []
    with VECTORS_FILE.open(encoding="utf-8") as lines:
        vectors = [json.loads(line) for line in lines if line.strip()]
    return [vector for vector in vectors if vector["category"] == category]


MATRIX = load_vectors("matrix")

pytestmark = needs(MATRIX, f"graft vectors not found at {VECTORS_FILE}")


def generate_input(generator: dict[str, Any]) -> bytes:
    """Rebuild a vector's input bytes from its ``input.generator`` description."""
    kind, size = generator["kind"], generator["size"]
    if kind == "random":
        return random.Random(generator["seed"]).randbytes(size)
    if kind == "zeros":
        return bytes(size)
    if kind == "text":
        lines = (
            b"export PATH=/cvmfs/software/bin:$PATH  # %d\n" % i for i in range(size // 40 + 1)
        )
        return b"".join(lines)[:size]
    if kind == "mixed":
        rng = random.Random(generator["seed"])
        blocks = (rng.randbytes(4 * KIB) + bytes(12 * KIB) for _ in range(size // (16 * KIB) + 1))
        return b"".join(blocks)[:size]
    raise ValueError(f"unknown generator kind {kind!r}")


def reference_hash(data: bytes, algorithm: str) -> str:
    """Hash ``data`` the way graft files spell it, with the standard library only."""
    if algorithm == "sha1":
        return hashlib.sha1(data, usedforsecurity=False).hexdigest()
    if algorithm == "rmd160":
        return hashlib.new("ripemd160", data).hexdigest() + "-rmd160"
    return hashlib.shake_128(data).hexdigest(20) + "-shake128"


ALGORITHMS = ("sha1", "rmd160", "shake128")


@functools.lru_cache(maxsize=32)
def _expected_hashes(
    path: Path, compression: str, chunk_size: int
) -> tuple[int, tuple[int, ...], dict[str, tuple[str, ...]], dict[str, str]]:
    """Size, chunk offsets, chunk hashes and whole-file hash (per algorithm) by the rule."""
    data = path.read_bytes()
    encode = (lambda raw: zlib.compress(raw, 6)) if compression == "zlib" else (lambda raw: raw)
    stored = encode(data)
    whole = {algorithm: reference_hash(stored, algorithm) for algorithm in ALGORITHMS}
    if not chunk_size or len(data) <= chunk_size:
        return len(data), (), {}, whole
    offsets = tuple(range(0, len(data), chunk_size))
    ends = (*offsets[1:], len(data))
    pieces = [encode(data[start:end]) for start, end in zip(offsets, ends, strict=True)]
    hashes = {
        algorithm: tuple(reference_hash(piece, algorithm) for piece in pieces)
        for algorithm in ALGORITHMS
    }
    return len(data), offsets, hashes, whole


def expected_graft_text(path: Path, options: list[str]) -> str:
    """Compute the marker for ``path`` and swissknife-style ``options`` by the rule.

    Chunks at multiples of the chunk size of the input, each compressed on its own;
    a file is chunked only if larger than the chunk size; ``-b`` hashes the whole file's
    stored form; chunked files without ``-b`` get the null hash.
    """
    settings = {"-Z": "none", "-c": "24", "-a": "sha1"}
    bulk = False
    arguments = iter(options)
    for option in arguments:
        if option == "-b":
            bulk = True
        else:
            settings[option] = next(arguments)
    compression = "none" if settings["-Z"] == "none" else "zlib"
    algorithm = settings["-a"]
    size, offsets, hashes, whole = _expected_hashes(path, compression, int(settings["-c"]) * MIB)
    suffix = {"sha1": "", "rmd160": "-rmd160", "shake128": "-shake128"}[algorithm]
    checksum = whole[algorithm] if bulk or not offsets else "0" * 40 + suffix
    text = f"size={size}\nchecksum={checksum}\ncompression={compression}\n"
    if offsets:
        text += "chunk_offsets=" + ",".join(map(str, offsets)) + "\n"
        text += "chunk_checksums=" + ",".join(hashes[algorithm]) + "\n"
    return text


def graft_fields(text: str) -> dict[str, str]:
    """Split a marker into its ``key=value`` fields."""
    return dict(line.split("=", 1) for line in text.splitlines())


def recorded_exactly(vector: Vector) -> bool:
    """Tell whether a vector's recorded result is one a client can read (compare exactly)."""
    derived = vector.get("derived")
    if not derived:
        return True
    unchunked = "chunk_offsets=" not in (vector["graft_file"] or "")
    whole_stream = derived["checksum_covers"] == [0, derived["zlib_level6_stream_bytes"]]
    return unchunked and whole_stream


class InputCache:
    """Generated vector inputs, written once per test run and shared by all vectors."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._paths: dict[str, Path] = {}

    def path_for(self, generator: dict[str, Any], sha1: str | None = None) -> Path:
        """Return a file holding the generator's bytes, creating it on first use."""
        key = json.dumps(generator, sort_keys=True)
        path = self._paths.get(key)
        if path is None:
            data = generate_input(generator)
            if sha1 is not None:
                assert hashlib.sha1(data, usedforsecurity=False).hexdigest() == sha1, (
                    f"generator {key} is not faithful"
                )
            path = self.directory / f"input-{len(self._paths):03d}.bin"
            path.write_bytes(data)
            self._paths[key] = path
        return path


@pytest.fixture(scope="session")
def vector_inputs(tmp_path_factory: pytest.TempPathFactory) -> InputCache:
    """Provide the cache of generated inputs."""
    return InputCache(tmp_path_factory.mktemp("graft-inputs"))


@pytest.fixture
def umask_0022() -> Iterator[None]:
    """Run the test with umask 0022, as the vectors were recorded, and restore it after."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``graft`` in-process; return exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run_graft(argv, io.BytesIO(), stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.usefixtures("umask_0022")
@pytest.mark.parametrize("vector", MATRIX, ids=[vector["id"] for vector in MATRIX])
def test_matrix_vector(vector: Vector, vector_inputs: InputCache, tmp_path: Path) -> None:
    """Grafting a vector's input gives the recorded files and output, or the rule's values."""
    source = vector_inputs.path_for(vector["input"]["generator"], vector["input"]["sha1"])
    source.chmod(int(vector["input"]["mode"], 8))
    placeholder = tmp_path / "f"
    marker = tmp_path / ".cvmfsgraft-f"

    # Both runs at once: zlib releases the GIL, and the large vectors dominate the time.
    with ThreadPoolExecutor(2) as pool:
        with_output = pool.submit(
            run_cli, ["-i", str(source), "-o", str(placeholder), *vector["options"]]
        )
        without_output = pool.submit(run_cli, ["-i", str(source), *vector["options"]])
    code, stdout, stderr = with_output.result()
    assert (code, stdout, stderr) == (vector["exit_code"], vector["stdout"], vector["stderr"])
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [".cvmfsgraft-f", "f"]
    assert f"{marker.stat().st_mode & 0o7777:04o}" == vector["graft_file_mode"]
    assert placeholder.stat().st_size == vector["placeholder_size"]
    assert f"{placeholder.stat().st_mode & 0o7777:04o}" == vector["placeholder_mode"]
    written = marker.read_text(encoding="ascii")

    code, stdout, stderr = without_output.result()
    assert code == vector["exit_code_without_o"]
    assert stderr == vector["stderr_without_o"]
    assert stdout == f"Grafting {source}\n{written}"

    if recorded_exactly(vector):
        assert written == vector["graft_file"]
        assert stdout == vector["stdout_without_o"].replace("<in>", str(source))
    else:
        assert written == expected_graft_text(source, vector["options"])
        ours, recorded = graft_fields(written), graft_fields(vector["graft_file"])
        for field in ("size", "compression", "chunk_offsets"):
            assert ours.get(field) == recorded.get(field), field


def test_vector_classification_covers_the_matrix() -> None:
    """The exactly compared vectors include every -Z none one and 154 unchunked zlib ones."""
    exact = [vector for vector in MATRIX if recorded_exactly(vector)]
    zlib_exact = [vector for vector in exact if vector.get("derived")]
    assert len(MATRIX) == 840
    assert len(exact) - len(zlib_exact) == sum(1 for v in MATRIX if not v.get("derived"))
    assert len(zlib_exact) == 154
