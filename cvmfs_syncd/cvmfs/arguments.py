"""Which arguments may reach ``cvmfs_server``: validation of every value put into an argv.

``cvmfs_server`` is a shell script that re-assembles several arguments into command
strings run by ``sh -c`` (the publish message, tag names, the transaction path, and for
``ingest`` the base directory and the paths to delete, which it does not even quote), so an
argument that is safe for our argv can still be split or interpreted there.  Only characters
that mean nothing to a shell are accepted.  Each function returns the value to put into the
argv or raises :class:`~cvmfs_syncd.errors.CvmfsCommandError`.  Pure.
"""

from __future__ import annotations

import re

from cvmfs_syncd.cvmfs.tags import UNDO_TAGS
from cvmfs_syncd.errors import CvmfsCommandError

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,253}$")
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9._+@%=,-]+$")
_TAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@-]*$")
_MESSAGE = re.compile(r"^[A-Za-z0-9 ._,:+=@/%-]*$")
MESSAGE_MAX = 200
"""Longest publish message accepted, in characters."""


def repo_name(repo: str) -> str:
    """Return ``repo`` if it is a valid repository name."""
    if not _REPO_NAME.match(repo):
        raise CvmfsCommandError(f"invalid repository name {repo!r}")
    return repo


def is_shell_safe_path(path: str) -> bool:
    """Whether every component of the repository path ``path`` survives the tool's shell.

    Components may hold letters, digits and ``._+@%=,-``; ``.`` and ``..`` are refused and
    empty components (doubled or outer slashes) are ignored.  ``""`` is safe (the root).
    """
    return all(
        part not in (".", "..") and _PATH_COMPONENT.match(part) is not None
        for part in path.split("/")
        if part
    )


def repo_path(path: str, what: str) -> str:
    """Return the repository path ``path`` normalised (no outer or doubled slashes).

    ``what`` names the argument in the error raised for a path that is empty or not
    :func:`is_shell_safe_path`.
    """
    parts = [part for part in path.split("/") if part]
    if not parts or not is_shell_safe_path(path):
        raise CvmfsCommandError(f"invalid {what} {path!r}")
    return "/".join(parts)


def scoped(repo: str, path: str | None) -> str:
    """Return ``R`` or ``R/path`` for a (path-scoped) ``transaction``."""
    repo_name(repo)
    if path is None or not [part for part in path.split("/") if part]:
        return repo
    return repo + "/" + repo_path(path, "transaction path")


def message(text: str) -> str:
    """Return a publish message with its whitespace collapsed, if the tool's shell leaves it be.

    At most :data:`MESSAGE_MAX` characters of letters, digits, spaces and ``._,:+=@/%-``, and
    no word may start with ``-``.
    """
    words = text.split()
    if (
        len(text) > MESSAGE_MAX
        or not _MESSAGE.match(text)
        or any(word.startswith("-") for word in words)
    ):
        raise CvmfsCommandError(
            f"publish message {text!r} must be at most {MESSAGE_MAX} characters of "
            "letters, digits, spaces and ._,:+=@/%- with no word starting with '-'"
        )
    return " ".join(words)


def tag_name(name: str) -> str:
    """Return ``name`` if it is a tag name that may be removed."""
    if not _TAG_NAME.match(name):
        raise CvmfsCommandError(f"invalid tag name {name!r}")
    if name in UNDO_TAGS:
        raise CvmfsCommandError(f"the undo tag {name!r} cannot be removed")
    return name


def timeout(value: float | None, default: float) -> float:
    """Return ``value`` (or ``default`` when it is None) as a positive number of seconds."""
    chosen = default if value is None else value
    if not chosen > 0:
        raise CvmfsCommandError(f"timeout must be positive, not {chosen!r}")
    return float(chosen)


def argv_prefix(name: str, prefix: tuple[str, ...]) -> tuple[str, ...]:
    """Return the command prefix ``prefix`` if it is a non-empty tuple of non-empty strings."""
    if (
        not isinstance(prefix, tuple)
        or not prefix
        or not all(isinstance(part, str) and part for part in prefix)
    ):
        raise CvmfsCommandError(f"{name} must be a non-empty tuple of non-empty strings")
    return prefix
