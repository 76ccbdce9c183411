"""Where an archive's symlinks lead: inside the base directory, or out of it.

A relative target is resolved the way the kernel would, starting in the symlink's own
directory, one component at a time: ``.`` and empty components change nothing; ``..`` goes
up one directory and must never go above the base directory (not even on the way to a
place inside it); a component that names another symlink of the same archive and is
followed by more components is replaced by that symlink's target, resolved from that
symlink's directory, as the kernel follows it. The last component is not followed: if it
is a symlink, that symlink is checked on its own. Components the archive does not have are
taken as directories (a dangling link is no escape). This is decided once every member has
been seen, so the order of members does not matter.

An absolute target leaves the base by definition; it is refused unless absolute targets
are allowed, and then it is not looked into. A relative target that reaches an (allowed)
absolute symlink in its middle leads where that symlink leads, so it is allowed with it.

Resolution gives up, refusing the link, after 40 symlinks (Linux's limit) or
:data:`MAX_STEPS` components, so that a hostile archive cannot make it slow.
"""

from __future__ import annotations

from collections import deque

from cvmfs_syncd.ingest.model import RefusalReason

#: Most symlinks followed while resolving one target (Linux's MAXSYMLINKS).
MAX_HOPS = 40
#: Most components looked at while resolving one target.
MAX_STEPS = 1024


class _Node:
    """A directory (or symlink) of the archive on the way to some symlink."""

    __slots__ = ("children", "target")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.target: str | None = None


class SymlinkTree:
    """The symlinks of one archive by path, for resolving targets through them.

    A tree of components rather than a map of paths, so that each step of a resolution
    costs the same however deep it is.
    """

    def __init__(self) -> None:
        self._root = _Node()

    def add(self, path: str, target: str) -> None:
        """Record the symlink at member path ``path`` (normalised) pointing to ``target``."""
        node = self._root
        for part in path.split("/"):
            node = node.children.setdefault(part, _Node())
        node.target = target

    def refusal(
        self, path: str, target: str, *, allow_absolute: bool
    ) -> tuple[RefusalReason, str] | None:
        """Return why the symlink at ``path`` with ``target`` is refused, or None if it stays
        inside the base directory (or leaves it only through an allowed absolute target)."""
        if target.startswith("/"):
            if allow_absolute:
                return None
            return RefusalReason.SYMLINK_ABSOLUTE, f"the target {target!r} is absolute"
        # stack[i] is the node of the (i+1)-th directory below the base; None where the
        # archive has nothing of that name (no symlink can be below it).
        stack: list[_Node | None] = []
        node: _Node | None = self._root
        for part in path.split("/")[:-1]:
            node = node.children.get(part) if node is not None else None
            stack.append(node)
        pending = deque(target.split("/"))
        hops = steps = 0
        while pending:
            steps += 1
            if steps > MAX_STEPS:
                why = f"resolving {target!r} takes more than {MAX_STEPS} steps"
                return RefusalReason.BAD_LINK_TARGET, why
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    return (
                        RefusalReason.SYMLINK_ESCAPE,
                        f"the target {target!r} leads out of the base",
                    )
                stack.pop()
                continue
            here = stack[-1] if stack else self._root
            child = here.children.get(part) if here is not None else None
            if child is not None and child.target is not None and pending:
                hops += 1
                if hops > MAX_HOPS:
                    why = f"resolving {target!r} follows more than {MAX_HOPS} symlinks"
                    return RefusalReason.BAD_LINK_TARGET, why
                if child.target.startswith("/"):
                    if allow_absolute:
                        return None
                    why = f"the target {target!r} passes through an absolute symlink"
                    return RefusalReason.SYMLINK_ESCAPE, why
                pending.extendleft(reversed(child.target.split("/")))
                continue
            stack.append(child)
        return None
