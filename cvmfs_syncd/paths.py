"""Pure path policy: which names are skipped or refused, and how inputs map into a repository.

Nothing here touches the file system. Names coming from a staging directory are ``str``
values produced by :func:`os.fsdecode`, so bytes that are not valid UTF-8 appear as
surrogate escapes (U+DC80..U+DCFF); every length limit is measured on the
:func:`os.fsencode` form, which is what the kernel sees.

Repository paths are relative to the repository root: ``/``-separated, no leading slash,
``""`` for the root itself, and never containing empty, ``.`` or ``..`` components.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
from collections.abc import Iterable

from cvmfs_syncd.cvmfs.graft import GRAFT_PREFIX
from cvmfs_syncd.errors import UnsafeName

#: Longest file name (one path component) Linux accepts, in bytes.
NAME_MAX = 255
#: Longest S3 object key, in UTF-8 bytes.
S3_KEY_MAX = 1024

#: Prefix and suffix of the temporary names :mod:`cvmfs_syncd.fsops` creates while copying.
TEMP_PREFIX = ".cvmfs-syncd."
TEMP_SUFFIX = ".tmp"

# rsync writes into ".<name>.XXXXXX" (mkstemp-style, 6 characters from [A-Za-z0-9]) and
# renames onto <name> when done. The inner name must be non-empty.
_RSYNC_TEMP_RE = re.compile(r"\.(?s:.+)\.[A-Za-z0-9]{6}")
_OWN_TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]+" + re.escape(TEMP_SUFFIX))

# Names CernVM-FS gives a meaning to when they appear inside a repository.
_RESERVED_EXACT = {
    ".cvmfscatalog": "'.cvmfscatalog' marks a nested catalog boundary for CVMFS",
    ".cvmfsdirtab": "'.cvmfsdirtab' controls automatic nested catalog creation in CVMFS",
    ".cvmfsautocatalog": "'.cvmfsautocatalog' marks a nested catalog CVMFS created itself",
    ".cvmfs": "'.cvmfs' is the virtual directory CVMFS clients may show in the root",
}
RESERVED_PREFIX = ".cvmfs"

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Return True if ``name`` looks like a temporary, in-progress file that must not be published.

    ``name`` is one path component (if a ``/``-separated path is given, only its last
    component is tested). ``patterns`` are shell globs matched case-sensitively against the
    whole name (e.g. ``*.tmp``, ``.*.swp``). Two patterns are always applied, whatever the
    configuration says: rsync's in-progress name ``.<name>.XXXXXX`` (a leading dot, a
    non-empty name, a dot and exactly six ASCII letters or digits) and the temporary names
    this daemon creates itself. The rsync rule also matches a few real names such as
    ``.bashrc.backup``; skipping those is the price of never publishing a half-written file.
    """
    name = name.rsplit("/", 1)[-1]
    if _RSYNC_TEMP_RE.fullmatch(name) or _OWN_TEMP_RE.fullmatch(name):
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def reserved_name(name: str) -> str | None:
    """Return why ``name`` (one path component) is reserved by CernVM-FS, or None if it is not.

    Reserved: ``.cvmfscatalog``, ``.cvmfsdirtab``, ``.cvmfsautocatalog``, ``.cvmfsgraft-*``
    and, as a precaution, every other name starting with ``.cvmfs`` (including ``.cvmfs``
    itself). The repository's control files such as ``.cvmfspublished`` or
    ``.cvmfswhitelist`` live in the storage backend, not in the published namespace, so a
    staged file of that name would not overwrite them; it is refused anyway because a name
    that looks like a control file is confusing at best and CVMFS may give new ``.cvmfs*``
    names a meaning in later releases. The check is case-sensitive, like CVMFS.
    """
    if name in _RESERVED_EXACT:
        return _RESERVED_EXACT[name]
    if name.startswith(GRAFT_PREFIX):
        return f"{name!r} is a CVMFS graft file describing another file's content"
    if name.startswith(RESERVED_PREFIX):
        return f"{name!r} starts with '.cvmfs', a prefix CVMFS reserves for its control files"
    return None


def _encoded_len(component: str) -> int:
    """Return the length of ``component`` in bytes as the kernel sees it; raise UnsafeName."""
    try:
        return len(os.fsencode(component))
    except UnicodeEncodeError:
        raise UnsafeName(
            f"name {component!r} contains characters that cannot be encoded as a file name"
        ) from None


def check_component(component: str) -> None:
    """Raise ValueError (with the reason) unless ``component`` is a safe single file name.

    Safe: non-empty, not ``.`` or ``..``, no ``/`` or NUL, encodable by :func:`os.fsencode`
    and at most 255 bytes in that form.
    """
    if component in ("", ".", ".."):
        raise UnsafeName(f"path component {component!r} is not allowed")
    if "/" in component:
        raise UnsafeName(f"path component {component!r} contains '/'")
    if "\0" in component:
        raise UnsafeName(f"path component {component!r} contains a NUL character")
    size = _encoded_len(component)
    if size > NAME_MAX:
        raise UnsafeName(f"name {component[:40]!r}... is {size} bytes long; the limit is 255")


def split_repo_path(path: str) -> list[str]:
    """Split a repository path (``a/b/c``, ``""`` for the root) into checked components.

    Raise ValueError if it has a leading or trailing slash, or any component fails
    :func:`check_component`.
    """
    if path == "":
        return []
    if path.startswith("/"):
        raise UnsafeName(f"repository path {path!r} must be relative (no leading '/')")
    parts = path.split("/")
    for part in parts:
        check_component(part)
    return parts


def repo_path(target: str, rel_path: str) -> str:
    """Join a source-relative path under a target directory; return a repository path.

    ``target`` is an absolute repository directory such as ``"/"`` or ``"/ci"`` (redundant
    slashes are tolerated; ``.``/``..`` components are not). ``rel_path`` is ``/``-separated
    and relative to the source; ``""`` names the target directory itself. The result has
    no leading slash and is ``""`` for the repository root.

    Raise ValueError (naming the problem) if ``rel_path`` is absolute or has empty, ``.``
    or ``..`` components, a NUL, a component longer than 255 bytes in
    :func:`os.fsencode` form, or characters :func:`os.fsencode` cannot encode; likewise
    if ``target`` is not absolute or has such components.
    """
    if not target.startswith("/"):
        raise UnsafeName(f"target {target!r} must be an absolute repository path")
    target_parts = [p for p in target.split("/") if p != ""]
    for part in target_parts:
        check_component(part)
    if rel_path.startswith("/"):
        raise UnsafeName(f"path {rel_path!r} must be relative to the source, not absolute")
    rel_parts = split_repo_path(rel_path)
    return "/".join(target_parts + rel_parts)


class KeyRefusal(enum.StrEnum):
    """Why an S3 key does not map to a repository path."""

    OUTSIDE_PREFIX = "outside-prefix"
    DIRECTORY_MARKER = "directory-marker"
    ABSOLUTE = "absolute"
    EMPTY_SEGMENT = "empty-segment"
    DOT_SEGMENT = "dot-segment"
    NUL = "nul"
    NOT_UTF8 = "not-utf8"
    CONTROL_CHARACTER = "control-character"
    KEY_TOO_LONG = "key-too-long"
    NAME_TOO_LONG = "name-too-long"
    RESERVED_NAME = "reserved-name"
    COLLISION = "collision"
    FILE_DIRECTORY_CONFLICT = "file-directory-conflict"


class KeyRefused(ValueError):
    """An S3 key was refused; ``reason`` says why in a stable code, ``str()`` in a sentence.

    ``ignorable`` is True for refusals that are not problems (directory marker objects),
    which callers should skip silently rather than report.
    """

    def __init__(self, key: str, reason: KeyRefusal, detail: str) -> None:
        self.key = key
        self.reason = reason
        self.detail = detail
        super().__init__(f"S3 key {key!r} refused ({reason.value}): {detail}")

    @property
    def ignorable(self) -> bool:
        """Return True if the key should be skipped without reporting it."""
        return self.reason is KeyRefusal.DIRECTORY_MARKER

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyRefused):
            return NotImplemented
        return (self.key, self.reason, self.detail) == (other.key, other.reason, other.detail)

    def __hash__(self) -> int:
        return hash((self.key, self.reason, self.detail))


def _key_prefix(prefix: str) -> str:
    # A configured prefix is a directory: "builds" means keys under "builds/", so that
    # "builds2/x" does not turn into the path "2/x".
    if prefix and not prefix.endswith("/"):
        return prefix + "/"
    return prefix


def s3_key_to_rel_path(key: str, prefix: str = "", *, allow_reserved_names: bool = False) -> str:
    """Map an untrusted S3 object key below ``prefix`` to a safe source-relative path.

    ``prefix`` is treated as a directory (``"data"`` and ``"data/"`` both mean keys that
    start with ``data/``; ``""`` means the whole bucket). The returned path is the key with
    the prefix removed, unchanged otherwise: keys are never normalised, so two different
    keys never map to the same path.

    Raise :class:`KeyRefused` with a :class:`KeyRefusal` reason for keys outside the
    prefix, directory marker objects (``dir/``, ignorable), a leading ``/``, empty
    components (``a//b``), ``.``/``..`` components, NUL, lone surrogates (not UTF-8),
    control characters, keys over 1024 UTF-8 bytes, components over 255 bytes, and, unless
    ``allow_reserved_names``, components that are CVMFS reserved names.
    """

    def refuse(reason: KeyRefusal, detail: str) -> KeyRefused:
        return KeyRefused(key, reason, detail)

    if "\0" in key:
        raise refuse(KeyRefusal.NUL, "contains a NUL character")
    if _SURROGATE_RE.search(key):
        raise refuse(KeyRefusal.NOT_UTF8, "is not valid UTF-8")
    if _CONTROL_RE.search(key):
        raise refuse(KeyRefusal.CONTROL_CHARACTER, "contains a control character")
    if len(key.encode("utf-8")) > S3_KEY_MAX:
        raise refuse(KeyRefusal.KEY_TOO_LONG, f"is longer than {S3_KEY_MAX} bytes")
    full_prefix = _key_prefix(prefix)
    if not key.startswith(full_prefix):
        raise refuse(KeyRefusal.OUTSIDE_PREFIX, f"does not start with {full_prefix!r}")
    rel = key[len(full_prefix) :]
    if rel == "" or rel.endswith("/"):
        raise refuse(KeyRefusal.DIRECTORY_MARKER, "is a directory marker object")
    if rel.startswith("/"):
        raise refuse(KeyRefusal.ABSOLUTE, "has a '/' right after the prefix")
    for part in rel.split("/"):
        if part == "":
            raise refuse(KeyRefusal.EMPTY_SEGMENT, "has an empty path component ('//')")
        if part in (".", ".."):
            raise refuse(KeyRefusal.DOT_SEGMENT, f"has a {part!r} path component")
        if len(part.encode("utf-8")) > NAME_MAX:
            raise refuse(KeyRefusal.NAME_TOO_LONG, f"has a name longer than {NAME_MAX} bytes")
        why = None if allow_reserved_names else reserved_name(part)
        if why is not None:
            raise refuse(KeyRefusal.RESERVED_NAME, why)
    return rel


def resolve_key_collisions(
    keys: Iterable[str], prefix: str = "", *, allow_reserved_names: bool = False
) -> tuple[dict[str, str], list[tuple[str, KeyRefused]]]:
    """Map a listing of S3 keys to paths, refusing unsafe keys and settling conflicts.

    Return ``(winners, losers)``: ``winners`` maps each source-relative path to the one key
    that provides it; ``losers`` lists ``(key, refusal)`` for every other distinct key,
    sorted by key (refusals from :func:`s3_key_to_rel_path` included; directory markers
    appear with an ignorable refusal). Duplicate keys in the input count once.

    Rules, chosen so the result depends only on the set of keys (not on listing order, so
    it is the same across restarts):

    * A key whose path is also a directory of another accepted key (``x`` next to ``x/y``)
      loses with ``file-directory-conflict``: the directory wins because it carries every
      key below it, while only one object is lost the other way round.
    * If several keys map to the same path (impossible with today's mapping, which never
      normalises, but kept as a guard), the smallest key in code-point order wins and the
      others lose with ``collision``.
    """
    by_path: dict[str, list[str]] = {}
    losers: list[tuple[str, KeyRefused]] = []
    for key in sorted(set(keys)):
        try:
            rel = s3_key_to_rel_path(key, prefix, allow_reserved_names=allow_reserved_names)
        except KeyRefused as refusal:
            losers.append((key, refusal))
            continue
        by_path.setdefault(rel, []).append(key)

    directories: set[str] = set()
    for rel in by_path:
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            directories.add("/".join(parts[:depth]))

    winners: dict[str, str] = {}
    for rel in sorted(by_path):
        first, *others = by_path[rel]  # already sorted: keys were visited in order
        for other in others:
            detail = f"maps to the same path {rel!r} as {first!r}"
            losers.append((other, KeyRefused(other, KeyRefusal.COLLISION, detail)))
        if rel in directories:
            detail = f"{rel!r} is also a directory holding other keys; the directory wins"
            losers.append((first, KeyRefused(first, KeyRefusal.FILE_DIRECTORY_CONFLICT, detail)))
            continue
        winners[rel] = first
    losers.sort(key=lambda item: item[0])
    return winners, losers
