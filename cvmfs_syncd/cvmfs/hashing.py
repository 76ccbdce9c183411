"""Checksums and object names as CernVM-FS spells them.

A checksum is 40 lower-case hex digits of a hash of the *stored* bytes plus the suffix of
its algorithm (none for SHA-1, ``-rmd160``, ``-shake128``); the object it names lives at
``data/<2 hex>/<38 hex><suffix>`` (:func:`object_name`), with ``P`` appended for a chunk
of a chunked file.  :class:`ContentHasher` hashes incrementally in any of the three
algorithms; :class:`Ripemd160` stands in where OpenSSL does not offer RIPEMD-160.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from typing import Final, Protocol

from cvmfs_syncd.errors import GraftError

HASH_SUFFIXES: Final[dict[str, str]] = {"sha1": "", "rmd160": "-rmd160", "shake128": "-shake128"}
"""Hash algorithm name -> suffix appended to the 40 hex digits of a checksum."""

DIGEST_HEX_LENGTH: Final = 40
NULL_DIGEST: Final = "0" * DIGEST_HEX_LENGTH

_CHECKSUM_PATTERN: Final = re.compile(r"([0-9a-f]{40})(-rmd160|-shake128)?")


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Shake128Digest:
    """SHAKE-128 cut to 20 bytes, behind the same interface as the fixed-size digests."""

    def __init__(self) -> None:
        self._inner = hashlib.shake_128()

    def update(self, data: bytes, /) -> None:
        self._inner.update(data)

    def hexdigest(self) -> str:
        return self._inner.hexdigest(DIGEST_HEX_LENGTH // 2)


_MASK32: Final = 0xFFFFFFFF

# RIPEMD-160 message word selection and rotation amounts for the left and right lines,
# one row of 16 per round (ISO/IEC 10118-3).
_RMD_WORDS_LEFT: Final = (
    *range(16),
    *(7, 4, 13, 1, 10, 6, 15, 3, 12, 0, 9, 5, 2, 14, 11, 8),
    *(3, 10, 14, 4, 9, 15, 8, 1, 2, 7, 0, 6, 13, 11, 5, 12),
    *(1, 9, 11, 10, 0, 8, 12, 4, 13, 3, 7, 15, 14, 5, 6, 2),
    *(4, 0, 5, 9, 7, 12, 2, 10, 14, 1, 3, 8, 11, 6, 15, 13),
)
_RMD_WORDS_RIGHT: Final = (
    *(5, 14, 7, 0, 9, 2, 11, 4, 13, 6, 15, 8, 1, 10, 3, 12),
    *(6, 11, 3, 7, 0, 13, 5, 10, 14, 15, 8, 12, 4, 9, 1, 2),
    *(15, 5, 1, 3, 7, 14, 6, 9, 11, 8, 12, 2, 10, 0, 4, 13),
    *(8, 6, 4, 1, 3, 11, 15, 0, 5, 12, 2, 13, 9, 7, 10, 14),
    *(12, 15, 10, 4, 1, 5, 8, 7, 6, 2, 13, 14, 0, 3, 9, 11),
)
_RMD_SHIFTS_LEFT: Final = (
    *(11, 14, 15, 12, 5, 8, 7, 9, 11, 13, 14, 15, 6, 7, 9, 8),
    *(7, 6, 8, 13, 11, 9, 7, 15, 7, 12, 15, 9, 11, 7, 13, 12),
    *(11, 13, 6, 7, 14, 9, 13, 15, 14, 8, 13, 6, 5, 12, 7, 5),
    *(11, 12, 14, 15, 14, 15, 9, 8, 9, 14, 5, 6, 8, 6, 5, 12),
    *(9, 15, 5, 11, 6, 8, 13, 12, 5, 12, 13, 14, 11, 8, 5, 6),
)
_RMD_SHIFTS_RIGHT: Final = (
    *(8, 9, 9, 11, 13, 15, 15, 5, 7, 7, 8, 11, 14, 14, 12, 6),
    *(9, 13, 15, 7, 12, 8, 9, 11, 7, 7, 12, 7, 6, 15, 13, 11),
    *(9, 7, 15, 11, 8, 6, 6, 14, 12, 13, 5, 14, 13, 13, 7, 5),
    *(15, 5, 8, 11, 14, 14, 6, 14, 6, 9, 12, 9, 12, 5, 15, 8),
    *(8, 5, 12, 9, 12, 5, 14, 6, 8, 13, 6, 5, 15, 13, 11, 11),
)
_RMD_CONSTANTS_LEFT: Final = (0x00000000, 0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xA953FD4E)
_RMD_CONSTANTS_RIGHT: Final = (0x50A28BE6, 0x5C4DD124, 0x6D703EF3, 0x7A6D76E9, 0x00000000)


def _rotate_left(value: int, count: int) -> int:
    return ((value << count) | (value >> (32 - count))) & _MASK32


def _rmd_round_function(round_index: int, x: int, y: int, z: int) -> int:
    if round_index == 0:
        return x ^ y ^ z
    if round_index == 1:
        return (x & y) | (~x & z)
    if round_index == 2:
        return ((x | ~y) & _MASK32) ^ z
    if round_index == 3:
        return (x & z) | (y & ~z)
    return x ^ ((y | ~z) & _MASK32)


class Ripemd160:
    """RIPEMD-160 in pure Python, for interpreters whose OpenSSL hides ``ripemd160``.

    OpenSSL 3 moved RIPEMD-160 into its "legacy" provider, so ``hashlib.new("ripemd160")``
    fails on some systems. This class is a slow (a few MB/s) but complete substitute with
    the ``update``/``digest``/``hexdigest`` interface of :mod:`hashlib` objects.
    """

    digest_size: Final = 20
    block_size: Final = 64

    def __init__(self, data: bytes = b"") -> None:
        self._state = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0]
        self._pending = b""
        self._length = 0
        self.update(data)

    def update(self, data: bytes, /) -> None:
        """Append ``data`` to the message."""
        self._length += len(data)
        buffer = self._pending + bytes(data)
        whole = len(buffer) - len(buffer) % 64
        for start in range(0, whole, 64):
            self._compress(buffer[start : start + 64])
        self._pending = buffer[whole:]

    def digest(self) -> bytes:
        """Return the 20-byte digest of the message so far (the object stays usable)."""
        bit_length = (self._length * 8) & 0xFFFFFFFFFFFFFFFF
        padding = b"\x80" + b"\x00" * ((55 - self._length) % 64) + struct.pack("<Q", bit_length)
        final = Ripemd160()
        final._state = list(self._state)
        final._pending = self._pending
        final._length = self._length
        final.update(padding)
        return struct.pack("<5I", *final._state)

    def hexdigest(self) -> str:
        """Return :meth:`digest` as 40 lower-case hex digits."""
        return self.digest().hex()

    def _compress(self, block: bytes) -> None:
        words = struct.unpack("<16I", block)
        a1, b1, c1, d1, e1 = self._state
        a2, b2, c2, d2, e2 = self._state
        for step in range(80):
            round_index = step // 16
            t = (
                a1
                + _rmd_round_function(round_index, b1, c1, d1)
                + words[_RMD_WORDS_LEFT[step]]
                + _RMD_CONSTANTS_LEFT[round_index]
            ) & _MASK32
            t = (_rotate_left(t, _RMD_SHIFTS_LEFT[step]) + e1) & _MASK32
            a1, e1, d1, c1, b1 = e1, d1, _rotate_left(c1, 10), b1, t
            t = (
                a2
                + _rmd_round_function(4 - round_index, b2, c2, d2)
                + words[_RMD_WORDS_RIGHT[step]]
                + _RMD_CONSTANTS_RIGHT[round_index]
            ) & _MASK32
            t = (_rotate_left(t, _RMD_SHIFTS_RIGHT[step]) + e2) & _MASK32
            a2, e2, d2, c2, b2 = e2, d2, _rotate_left(c2, 10), b2, t
        h0, h1, h2, h3, h4 = self._state
        self._state = [
            (h1 + c1 + d2) & _MASK32,
            (h2 + d1 + e2) & _MASK32,
            (h3 + e1 + a2) & _MASK32,
            (h4 + a1 + b2) & _MASK32,
            (h0 + b1 + c2) & _MASK32,
        ]


@functools.cache
def _hashlib_has_ripemd160() -> bool:
    try:
        hashlib.new("ripemd160")
    except ValueError:
        return False
    return True


class ContentHasher:
    """Incremental hash in one of the algorithms CernVM-FS names objects with.

    ``algorithm`` is ``"sha1"``, ``"rmd160"`` or ``"shake128"`` (SHAKE-128 with a 20-byte
    output); anything else raises :class:`GraftError`. :meth:`checksum` gives the 40 hex
    digits followed by the algorithm suffix, as graft files and object names spell it.
    """

    def __init__(self, algorithm: str) -> None:
        if algorithm not in HASH_SUFFIXES:
            raise GraftError(
                f"unknown hash algorithm {algorithm!r} (expected one of {', '.join(HASH_SUFFIXES)})"
            )
        self.algorithm = algorithm
        self._digest: _Digest
        if algorithm == "sha1":
            self._digest = hashlib.sha1(usedforsecurity=False)
        elif algorithm == "rmd160":
            self._digest = hashlib.new("ripemd160") if _hashlib_has_ripemd160() else Ripemd160()
        else:
            self._digest = _Shake128Digest()

    def update(self, data: bytes) -> None:
        """Feed ``data`` (hashlib releases the GIL for large pieces)."""
        self._digest.update(data)

    def hexdigest(self) -> str:
        """Return the 40 lower-case hex digits of the hash of everything fed so far."""
        return self._digest.hexdigest()

    def checksum(self) -> str:
        """Return :meth:`hexdigest` plus the algorithm suffix (``…-rmd160``)."""
        return self.hexdigest() + HASH_SUFFIXES[self.algorithm]


def content_checksum(data: bytes, algorithm: str = "sha1") -> str:
    """Return the checksum (hex digits plus algorithm suffix) of ``data``.

    Raises :class:`GraftError` for an unknown algorithm.
    """
    hasher = ContentHasher(algorithm)
    hasher.update(data)
    return hasher.checksum()


def null_checksum(algorithm: str = "sha1") -> str:
    """Return the null hash of ``algorithm``: 40 zeros plus its suffix.

    Raises :class:`GraftError` for an unknown algorithm.
    """
    if algorithm not in HASH_SUFFIXES:
        raise GraftError(f"unknown hash algorithm {algorithm!r}")
    return NULL_DIGEST + HASH_SUFFIXES[algorithm]


def algorithm_of(checksum: str) -> str:
    """Return the algorithm name a checksum is written in (``"sha1"`` when it has no suffix).

    Raises :class:`GraftError` if ``checksum`` is not 40 lower-case hex digits plus an
    optional known suffix.
    """
    match = _CHECKSUM_PATTERN.fullmatch(checksum)
    if match is None:
        raise GraftError(f"not a checksum: {checksum!r}")
    suffix = match.group(2) or ""
    return next(name for name, known in HASH_SUFFIXES.items() if known == suffix)


def is_null_checksum(checksum: str) -> bool:
    """Tell whether ``checksum`` is a null hash (40 zeros, any algorithm suffix)."""
    return checksum[:DIGEST_HEX_LENGTH] == NULL_DIGEST


def object_name(checksum: str, *, partial: bool = False) -> str:
    """Return the storage path of the object named by ``checksum``.

    ``data/<first 2 hex>/<other 38 hex><algorithm suffix>`` plus ``P`` for a chunk of a
    chunked file (``partial=True``). Raises :class:`GraftError` for a malformed checksum.
    """
    algorithm_of(checksum)
    return f"data/{checksum[:2]}/{checksum[2:]}{'P' if partial else ''}"
