"""One exception root for cvmfs-syncd, with a subclass per subsystem."""

from __future__ import annotations


class SyncdError(Exception):
    """Root of every error cvmfs-syncd raises on purpose.

    Subclasses carry structured fields; ``str()`` gives a sentence for a human.
    """


class ConfigError(SyncdError):
    """The configuration is invalid: ``problems`` lists every error with its key path."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        where = f" in {path}" if path else ""
        super().__init__(f"{len(self.problems)} configuration error(s){where}")

    def __str__(self) -> str:
        head = super().__str__()
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class RepositoryConfigError(SyncdError):
    """A repository's own CVMFS configuration (server.conf, S3 config) is missing or unusable."""


class CvmfsCommandError(SyncdError):
    """A cvmfs_server or cvmfs_swissknife command failed in a way the caller did not expect."""


class GraftError(SyncdError):
    """A graft could not be computed (unreadable input, bad options)."""


class StorageError(SyncdError):
    """Writing or verifying data objects in the repository's storage failed."""


class StateError(SyncdError):
    """The state database (journal, index) is unusable."""


class SourceError(SyncdError):
    """An input source (staging directory, S3 prefix) is unavailable or refused an input."""


class UnsafeName(SyncdError, ValueError):
    """A name or path from an input that must never be published as it is: ``..``, an
    absolute path, a NUL byte, a component over 255 bytes, a key escaping its target.

    A ``ValueError`` too, so that code validating values treats it as one; but code that
    refuses an input catches this type only, never a programming error's ValueError."""
