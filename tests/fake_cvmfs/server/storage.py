"""Storage formats: object names, hashes and contents, and the signed files.

The signed files are ``.cvmfspublished`` (``Manifest``) and ``.cvmfswhitelist``
(``Whitelist``); where they and the objects live is ``repository.Repo``'s business.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

from tests.fake_cvmfs.server.clock import utc_from_fields

NULL_HEX = "0" * 40
ALGORITHMS = ("sha1", "rmd160", "shake128")
HASH_RE = re.compile(r"^([0-9a-f]{40})(-rmd160|-shake128)?$")
OBJECT_NAME_RE = re.compile(r"^([0-9a-f]{40})(-rmd160|-shake128)?([CPHXML]?)$")

# fixed manifest fields, as recorded (layouts/manifest_and_whitelist.md)
EMPTY_PATH_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
CATALOG_TTL = 240


def hash_hex(algorithm: str, data: bytes) -> str:
    """Digest ``data`` with one of the CVMFS hash algorithms (40 hex digits)."""
    if algorithm == "sha1":
        return hashlib.sha1(data, usedforsecurity=False).hexdigest()
    if algorithm == "rmd160":
        return hashlib.new("ripemd160", data, usedforsecurity=False).hexdigest()
    if algorithm == "shake128":
        return hashlib.shake_128(data).hexdigest(20)
    raise ValueError(f"unknown hash algorithm {algorithm}")


def algorithm_suffix(algorithm: str) -> str:
    """Return the object-name suffix of a hash algorithm (empty for SHA-1)."""
    return "" if algorithm == "sha1" else f"-{algorithm}"


def split_hash(value: str) -> tuple[str, str]:
    """Split ``<hex>[-algo]`` into (hex, algorithm); raise ValueError when malformed."""
    match = HASH_RE.match(value)
    if match is None:
        raise ValueError(f"malformed hash {value!r}")
    suffix = match.group(2) or ""
    return match.group(1), suffix[1:] if suffix else "sha1"


def is_null_hash(value: str) -> bool:
    """Whether ``value`` is the null hash (40 zeros, any algorithm suffix)."""
    return value[:40] == NULL_HEX


def object_path(data_dir: Path, name: str) -> Path:
    """Path of object ``name`` (hash + suffixes) below a storage's ``data`` directory."""
    return data_dir / name[:2] / name[2:]


def verify_object_bytes(name: str, payload: bytes) -> bool:
    """Whether ``payload`` hashes to the hash in object ``name`` (as ``check -i`` does)."""
    match = OBJECT_NAME_RE.match(name)
    if match is None:
        return False
    algorithm = (match.group(2) or "-sha1")[1:]
    try:
        return hash_hex(algorithm, payload) == match.group(1)
    except ValueError:
        return False


def inflate_complete(payload: bytes) -> bytes:
    """Decompress one complete zlib stream; raise ValueError when it is not exactly that."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload)
        data += inflater.flush()
    except zlib.error as exc:
        raise ValueError(str(exc)) from exc
    if not inflater.eof or inflater.unused_data:
        raise ValueError("incomplete or trailing zlib data")
    return data


def signature(key_file: Path, digest_hex: str) -> bytes:
    """256 bytes standing in for an RSA signature of ``digest_hex`` made with ``key_file``."""
    try:
        key = key_file.read_bytes()
    except OSError:
        key = b"missing key"
    out = b""
    counter = 0
    while len(out) < 256:
        out += hashlib.sha256(key + digest_hex.encode() + bytes([counter])).digest()
        counter += 1
    return out[:256]


def signed_file(text: str, key_file: Path) -> bytes:
    """Build the on-disk form of ``.cvmfspublished``/``.cvmfswhitelist``."""
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    return text.encode() + b"--\n" + digest.encode() + b"\n" + signature(key_file, digest)


def text_part(data: bytes) -> str:
    """Return the text part (before the ``--`` line) of a signed file."""
    head, sep, _ = data.partition(b"\n--\n")
    if not sep:
        raise ValueError("no signature separator")
    return head.decode() + "\n"


class Manifest:
    """The text fields of ``.cvmfspublished``."""

    def __init__(
        self,
        root_hash: str,
        catalog_size: int,
        revision: int,
        garbage_collectable: bool,
        name: str,
        certificate: str,
        history: str,
        timestamp: int,
        meta_info: str,
        reflog: str,
        ttl: int = CATALOG_TTL,
    ) -> None:
        self.root_hash = root_hash
        self.catalog_size = catalog_size
        self.revision = revision
        self.garbage_collectable = garbage_collectable
        self.name = name
        self.certificate = certificate
        self.history = history
        self.timestamp = timestamp
        self.meta_info = meta_info
        self.reflog = reflog
        self.ttl = ttl

    def text(self) -> str:
        """Render the manifest's text part (fields in the recorded order)."""
        return (
            f"C{self.root_hash}\nB{self.catalog_size}\nR{EMPTY_PATH_MD5}\nD{self.ttl}\n"
            f"S{self.revision}\nG{'yes' if self.garbage_collectable else 'no'}\nAno\n"
            f"N{self.name}\nX{self.certificate}\nH{self.history}\nT{self.timestamp}\n"
            f"M{self.meta_info}\nY{self.reflog}\n"
        )

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse the text part of a manifest file."""
        fields: dict[str, str] = {}
        for line in text_part(data).splitlines():
            if line:
                fields[line[0]] = line[1:]
        return cls(
            root_hash=fields["C"],
            catalog_size=int(fields["B"]),
            revision=int(fields["S"]),
            garbage_collectable=fields.get("G") == "yes",
            name=fields["N"],
            certificate=fields["X"],
            history=fields["H"],
            timestamp=int(fields["T"]),
            meta_info=fields["M"],
            reflog=fields["Y"],
            ttl=int(fields.get("D", CATALOG_TTL)),
        )


class Whitelist:
    """The text fields of ``.cvmfswhitelist``."""

    def __init__(self, created: str, expires: str, name: str, fingerprints: list[str]) -> None:
        self.created = created
        self.expires = expires
        self.name = name
        self.fingerprints = fingerprints

    def text(self) -> str:
        """Render the whitelist's text part."""
        lines = [self.created, f"E{self.expires}", f"N{self.name}", *self.fingerprints]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, data: bytes) -> Whitelist:
        """Parse the text part of a whitelist file."""
        lines = text_part(data).splitlines()
        expires = ""
        name = ""
        prints: list[str] = []
        seen: set[str] = set()
        for line in lines[1:]:
            letter = line[:1]
            if letter in ("E", "N") and letter not in seen and not prints:
                seen.add(letter)
                if letter == "E":
                    expires = line[1:]
                else:
                    name = line[1:]
            elif line:
                prints.append(line)
        return cls(
            created=lines[0] if lines else "", expires=expires, name=name, fingerprints=prints
        )

    def expiry(self) -> float | None:
        """Expiry as a UNIX timestamp, or None when the E line cannot be parsed."""
        text = self.expires
        if len(text) != 14 or not text.isdigit():
            return None
        fields = [int(text[0:4]), *(int(text[i : i + 2]) for i in range(4, 14, 2))]
        if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] < 24):
            return None
        return utc_from_fields(*fields)
