"""Does this interpreter's zlib write the same data objects as CernVM-FS?

The daemon may compress data objects itself (with :mod:`zlib`) and store them under the
hash of the compressed bytes. Such an object deduplicates with the one ``cvmfs_server
publish`` writes for the same file only if both zlib builds emit exactly the same level-6
stream. Deflate output is not specified byte for byte, so this is checked, once per process,
against checksums recorded from ``cvmfs_swissknife graft -Z zlib``: the inputs are rebuilt
from a few parameters stored in ``zlib_vectors.json`` (package data), compressed the two
ways :mod:`cvmfs_syncd.cvmfs.graft` compresses objects (in one call, and streamed piece by
piece), and hashed as CernVM-FS names objects.

Only unchunked vectors whose recorded checksum covers the whole compressed stream are used:
for incompressible inputs of 16 KiB and more ``cvmfs_swissknife`` hashes only a prefix of
the stream, which names no complete object.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from cvmfs_syncd.cvmfs.graft import GraftOptions, encode_object, graft_stream

VECTORS_RESOURCE: Final = "zlib_vectors.json"
"""Name of the package data file (in :mod:`cvmfs_syncd.pipeline`) holding the vectors."""

KIB: Final = 1024
GENERATOR_KINDS: Final = ("random", "zeros", "text", "mixed")


@dataclass(frozen=True)
class ZlibVector:
    """One recorded object: how to rebuild its input, and the checksum CernVM-FS gave it.

    ``kind`` is one of :data:`GENERATOR_KINDS`, ``seed`` is ``None`` for the kinds that take
    none. ``checksum`` is the hash in ``algorithm`` (with its suffix) of the level-6 zlib
    stream of the input, which is ``object_size`` bytes long.
    """

    id: str
    kind: str
    size: int
    seed: int | None
    input_sha1: str
    algorithm: str
    object_size: int
    checksum: str


def generate_input(kind: str, size: int, seed: int | None = None) -> bytes:
    """Rebuild an input of the reference recording from its generator parameters.

    Raises :class:`ValueError` for an unknown ``kind`` or a missing seed.
    """
    if kind == "zeros":
        return bytes(size)
    if kind == "text":
        lines = (
            b"export PATH=/cvmfs/software/bin:$PATH  # %d\n" % i for i in range(size // 40 + 1)
        )
        return b"".join(lines)[:size]
    if kind not in ("random", "mixed"):
        raise ValueError(f"unknown input generator {kind!r}")
    if seed is None:
        raise ValueError(f"the {kind!r} generator needs a seed")
    # Not for security: the inputs must be the recording's pseudo-random bytes.
    rng = random.Random(seed)  # noqa: S311
    if kind == "random":
        return rng.randbytes(size)
    blocks = (rng.randbytes(4 * KIB) + bytes(12 * KIB) for _ in range(size // (16 * KIB) + 1))
    return b"".join(blocks)[:size]


def _parse_vector(entry: object) -> ZlibVector:
    if not isinstance(entry, dict):
        raise ValueError(f"a vector is not an object: {entry!r}")
    try:
        generator = entry["generator"]
        seed = generator.get("seed")
        vector = ZlibVector(
            id=str(entry["id"]),
            kind=str(generator["kind"]),
            size=int(generator["size"]),
            seed=None if seed is None else int(seed),
            input_sha1=str(entry["input_sha1"]),
            algorithm=str(entry["algorithm"]),
            object_size=int(entry["object_size"]),
            checksum=str(entry["checksum"]),
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed vector {entry!r}: {error!r}") from error
    if vector.kind not in GENERATOR_KINDS:
        raise ValueError(f"vector {vector.id} has an unknown generator {vector.kind!r}")
    return vector


def parse_vectors(text: str) -> tuple[ZlibVector, ...]:
    """Parse the JSON document of ``zlib_vectors.json``.

    Raises :class:`ValueError` if it is not valid JSON, not shaped as expected, or empty.
    """
    document = json.loads(text)
    if not isinstance(document, dict) or not isinstance(document.get("vectors"), list):
        raise ValueError("expected an object with a list of vectors")
    vectors = tuple(_parse_vector(entry) for entry in document["vectors"])
    if not vectors:
        raise ValueError("the list of vectors is empty")
    return vectors


def load_vectors() -> tuple[ZlibVector, ...]:
    """Return the vectors shipped with the package.

    Raises :class:`OSError` if the data file cannot be read and :class:`ValueError` if it is
    malformed.
    """
    text = (
        resources.files("cvmfs_syncd.pipeline")
        .joinpath(VECTORS_RESOURCE)
        .read_text(encoding="utf-8")
    )
    return parse_vectors(text)


def _zlib_name() -> str:
    return f"zlib {zlib.ZLIB_RUNTIME_VERSION} (built against {zlib.ZLIB_VERSION})"


def check_vectors(vectors: tuple[ZlibVector, ...]) -> tuple[bool, str]:
    """Compare this interpreter's objects with ``vectors``, uncached.

    Returns ``(True, "")`` if every vector's object checksum matches, whether the object is
    compressed in one call or streamed; otherwise ``(False, reason)`` for the first vector
    that does not (or whose input cannot be rebuilt), naming the zlib version.
    """
    for vector in vectors:
        label = f"vector {vector.id} ({vector.kind}, {vector.size} bytes)"
        try:
            data = generate_input(vector.kind, vector.size, vector.seed)
        except ValueError as error:
            return False, f"cannot rebuild the input of {label}: {error}"
        if hashlib.sha1(data, usedforsecurity=False).hexdigest() != vector.input_sha1:
            return False, (
                f"cannot check {_zlib_name()}: the input of {label} does not rebuild to the "
                "recorded bytes (the random module's output changed?)"
            )
        options = GraftOptions(compression="zlib", chunk_size=0, algorithm=vector.algorithm)
        checksum, stored = encode_object(data, options)
        if checksum != vector.checksum:
            return False, (
                f"{_zlib_name()} does not write the objects CernVM-FS writes: {label}, "
                f"compressed in one call, is {len(stored)} bytes named {checksum}; "
                f"CernVM-FS wrote {vector.object_size} bytes named {vector.checksum}"
            )
        streamed = graft_stream(io.BytesIO(data), options).checksum
        if streamed != vector.checksum:
            return False, (
                f"{_zlib_name()} does not write the objects CernVM-FS writes: {label}, "
                f"compressed as a stream, is named {streamed}; CernVM-FS wrote "
                f"{vector.object_size} bytes named {vector.checksum}"
            )
    return True, ""


@functools.cache
def zlib_matches_cvmfs() -> tuple[bool, str]:
    """Tell whether objects compressed here are byte-identical to CernVM-FS's own.

    Returns ``(True, "")`` when every shipped vector matches, else ``(False, reason)`` where
    the reason names the first mismatching vector and ``zlib.ZLIB_RUNTIME_VERSION`` (or says
    why the check could not run; that counts as a mismatch). Computed once per process
    (about 0.1 s); ``zlib_matches_cvmfs.cache_clear()`` forces a new check.
    """
    try:
        vectors = load_vectors()
    except (OSError, ValueError) as error:
        return False, f"cannot check {_zlib_name()}: reference vectors unavailable: {error}"
    return check_vectors(vectors)
