"""Command-line entry point (placeholder until the subcommands land)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    return 0
