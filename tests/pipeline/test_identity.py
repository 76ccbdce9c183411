"""The zlib identity check: passes here, fails for a zlib that writes other bytes."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cvmfs_syncd.pipeline import identity
from cvmfs_syncd.pipeline.identity import (
    ZlibVector,
    check_vectors,
    generate_input,
    load_vectors,
    parse_vectors,
    zlib_matches_cvmfs,
)
from tests.support import needs, reference_dir

VECTORS_FILE = reference_dir() / "graft" / "vectors.jsonl"


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """Every test sees a fresh check, and leaves none of its patched results behind."""
    zlib_matches_cvmfs.cache_clear()
    yield
    zlib_matches_cvmfs.cache_clear()


def at_level(level: int) -> tuple[Callable[..., bytes], Callable[..., Any]]:
    """Stand-ins for zlib.compress and zlib.compressobj that ignore the level asked for."""
    compress, compressobj = zlib.compress, zlib.compressobj

    def fake_compress(data: bytes, /, level_asked: int = -1, wbits: int = 15) -> bytes:
        del level_asked
        return compress(data, level, wbits)

    def fake_compressobj(level_asked: int = -1, *args: Any, **kwargs: Any) -> Any:
        del level_asked
        return compressobj(level, *args, **kwargs)

    return fake_compress, fake_compressobj


def test_this_interpreter_matches() -> None:
    assert zlib_matches_cvmfs() == (True, "")


def test_result_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    assert zlib_matches_cvmfs() == (True, "")
    fake_compress, fake_compressobj = at_level(9)
    monkeypatch.setattr(zlib, "compress", fake_compress)
    monkeypatch.setattr(zlib, "compressobj", fake_compressobj)
    assert zlib_matches_cvmfs() == (True, "")


def test_other_bytes_from_compress_are_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Level 9 agrees with level 6 on the small inputs: the first vector where it does not
    # is the one to be named.
    inputs = {v.id: generate_input(v.kind, v.size, v.seed) for v in load_vectors()}
    first = next(i for i, data in inputs.items() if zlib.compress(data, 9) != zlib.compress(data))
    fake_compress, _ = at_level(9)
    monkeypatch.setattr(zlib, "compress", fake_compress)
    ok, reason = zlib_matches_cvmfs()
    assert not ok
    assert zlib.ZLIB_RUNTIME_VERSION in reason
    assert "in one call" in reason
    assert f"vector {first} " in reason


def test_other_bytes_from_a_stream_are_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    _, fake_compressobj = at_level(1)
    monkeypatch.setattr(zlib, "compressobj", fake_compressobj)
    ok, reason = zlib_matches_cvmfs()
    assert not ok
    assert zlib.ZLIB_RUNTIME_VERSION in reason
    assert "as a stream" in reason


def test_missing_data_file_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "VECTORS_RESOURCE", "no-such-file.json")
    ok, reason = zlib_matches_cvmfs()
    assert not ok
    assert "reference vectors unavailable" in reason


def test_an_input_that_does_not_rebuild_is_reported() -> None:
    vector = ZlibVector("x1", "zeros", 10, None, "0" * 40, "sha1", 11, "1" * 40)
    ok, reason = check_vectors((vector,))
    assert not ok
    assert "x1" in reason
    assert "does not rebuild" in reason


@pytest.mark.parametrize(
    "text",
    ["[]", '{"vectors": []}', '{"vectors": [{"id": "a"}]}', "{", '{"vectors": [1]}'],
)
def test_malformed_data_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_vectors(text)


def test_unknown_generator_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown input generator"):
        generate_input("ones", 3)
    with pytest.raises(ValueError, match="needs a seed"):
        generate_input("random", 3)


def test_shipped_vectors_cover_the_kinds_of_input() -> None:
    vectors = load_vectors()
    assert 8 <= len(vectors) <= 12
    assert len({v.id for v in vectors}) == len(vectors)
    assert any(v.size == 0 for v in vectors)
    assert any(0 < v.size <= 8 for v in vectors)
    assert {v.kind for v in vectors} == {"random", "zeros", "text", "mixed"}
    assert any(v.object_size >= 256 * 1024 for v in vectors)
    assert any(v.size >= 150 * 1024 and v.kind == "text" for v in vectors)


@needs(VECTORS_FILE.exists(), f"no reference vectors at {VECTORS_FILE}")
def test_shipped_vectors_are_copied_from_the_recording() -> None:
    """Each shipped vector is an unchunked ``-Z zlib`` recording whose checksum covers the
    whole level-6 stream, with the same input, algorithm and checksum."""
    recorded: dict[str, dict[str, Any]] = {}
    with VECTORS_FILE.open(encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            recorded[entry["id"]] = entry
    for vector in load_vectors():
        entry = recorded[vector.id]
        generator = entry["input"]["generator"]
        assert (generator["kind"], generator["size"], generator.get("seed")) == (
            vector.kind,
            vector.size,
            vector.seed,
        )
        assert entry["input"]["sha1"] == vector.input_sha1
        options = entry["options"]
        assert options[options.index("-Z") + 1] in ("zlib", "default")
        algorithm = options[options.index("-a") + 1] if "-a" in options else "sha1"
        assert algorithm == vector.algorithm
        marker = dict(line.split("=", 1) for line in entry["graft_file"].splitlines())
        assert marker["compression"] == "zlib"
        assert "chunk_offsets" not in marker
        assert marker["checksum"] == vector.checksum
        derived = entry["derived"]
        assert derived["checksum_covers"] == [0, vector.object_size]
        assert derived["zlib_level6_stream_bytes"] == vector.object_size
