"""Declaring the keys of a TOML table once, as dataclass fields, and reading tables by them.

A key is a field of the frozen dataclass of its table, made by :func:`key` (with a default),
:func:`required`, :func:`subtable` (``[name]``) or :func:`tables` (``[[name]]``). Its
annotation is its type (a ``Literal`` lists the accepted words, ``X | None`` allows leaving
it unset, ``Path`` means an absolute path); the field's metadata holds its unit, a line of
documentation and an optional check. :class:`Reader` reads a table by these declarations,
collecting every problem with its key path; checks between keys of one table are registered
with :func:`cross_check` and run once the table is read. Fields made otherwise are no keys.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from cvmfs_syncd.config.units import parse_command, parse_duration, parse_size

Unit = Literal["plain", "size", "duration", "command"]
Check = Callable[[Any], Any]  # returns the (possibly normalised) value or raises ValueError

_T = TypeVar("_T")


@dataclass(frozen=True)
class Key:
    """How one key is written in the TOML file (kept in its dataclass field's metadata)."""

    doc: str
    unit: Unit = "plain"
    check: Check | None = None  # returns the (normalised) value or raises
    toml: str = ""  # the key in the file when it differs from the field name
    fold_case: bool = False
    nonempty: bool = False  # arrays of tables only: at least one is required


@dataclass(frozen=True)
class Declared:
    """One declared key of a table, as :func:`declared_keys` reports it."""

    name: str  # as written in the file
    attr: str  # the dataclass field
    kind: Any  # the field's resolved type
    key: Key
    default: Any  # MISSING when the key is required

    @property
    def required(self) -> bool:
        """True when the key has no default."""
        return self.default is MISSING


def key(
    default: _T,
    doc: str,
    *,
    unit: Unit = "plain",
    check: Check | None = None,
    toml: str = "",
    fold_case: bool = False,
) -> _T:
    """Declare a key with a default."""
    meta = Key(doc, unit, check, toml, fold_case)
    return field(default=default, metadata={"key": meta})


def required(doc: str, *, check: Check | None = None) -> Any:
    """Declare a key that must be set (an empty string counts as unset)."""
    return field(metadata={"key": Key(doc, check=check)})


def subtable(factory: Callable[[], _T], doc: str) -> _T:
    """Declare a ``[table]`` inside this one; absent, it has its defaults."""
    return field(default_factory=factory, metadata={"key": Key(doc)})


def tables(doc: str, *, toml: str = "", nonempty: bool = False) -> Any:
    """Declare an array of tables (``[[name]]``) inside this one."""
    return field(default=(), metadata={"key": Key(doc, toml=toml, nonempty=nonempty)})


# -- what the declarations say -----------------------------------------------------------


def declared_keys(cls: type) -> tuple[Declared, ...]:
    """The keys of the table declared by dataclass ``cls``, in declaration order."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = f.metadata.get("key")
        if isinstance(meta, Key):
            out.append(Declared(meta.toml or f.name, f.name, hints[f.name], meta, _default(f)))
    return tuple(out)


def _default(f: Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _table_of(kind: Any) -> tuple[type | None, bool]:
    """Return (dataclass, is_array) when ``kind`` is a table or an array of tables."""
    if is_dataclass(kind) and isinstance(kind, type):
        return kind, False
    args = get_args(kind)
    if get_origin(kind) is tuple and args and is_dataclass(args[0]) and isinstance(args[0], type):
        return args[0], True
    return None, False


def declared_tables(
    cls: type, header: str = "", array: bool = False
) -> Iterator[tuple[str, bool, type]]:
    """Yield (header, is_array, dataclass) of table ``cls`` and every table inside it."""
    yield header, array, cls
    for d in declared_keys(cls):
        table, inner_array = _table_of(d.kind)
        if table is not None:
            yield from declared_tables(table, join(header, d.name), inner_array)


# -- reading -------------------------------------------------------------------------------


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


class Reader:
    """Reads declared tables, collecting every problem with its key path."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.origin: dict[int, str] = {}  # id of each table read -> its key path

    def at(self, table: object) -> str:
        """The key path a table that was read came from."""
        return self.origin[id(table)]

    def unknown(self, data: dict[str, Any], where: str, known: list[str]) -> None:
        for name in sorted(set(data) - set(known)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problems.append(f"{join(where, name)}: unknown key{hint}")

    def table(self, cls: type[_T], data: object, where: str) -> _T | None:
        """Read ``data`` as table ``cls``; None if it lacks a required key. Raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError("expected a table")
        declared = declared_keys(cls)
        self.unknown(data, where, [d.name for d in declared])
        values: dict[str, Any] = {}
        complete = True
        for d in declared:
            at = join(where, d.name)
            if d.name not in data or (d.required and data[d.name] == ""):
                if d.required:
                    self.problems.append(f"{at}: required")
                    values[d.attr], complete = None, False
                elif d.key.nonempty:
                    self.problems.append(f"{at}: at least one [[{_header(at)}]] is required")
                continue
            try:
                values[d.attr] = self.value(d, data[d.name], at)
            except ValueError as exc:
                self.problems.append(f"{at}: {exc}")
                if d.required:
                    values[d.attr], complete = None, False
        result = cls(**values)
        self.origin[id(result)] = where
        for check in _CROSS_CHECKS.get(cls, ()):
            check(self, result, where)
        return result if complete else None

    def value(self, d: Declared, value: object, at: str) -> Any:
        table, array = _table_of(d.kind)
        if table is not None and not array:
            sub = self.table(table, value, at)
            return d.default if sub is None else sub
        if table is not None:
            return self.array(table, d.key, value, at)
        if d.key.unit == "size":
            out: Any = parse_size(value)
        elif d.key.unit == "duration":
            out = parse_duration(value)
        elif d.key.unit == "command":
            out = parse_command(value)
        else:
            out = _plain(d.kind, d.key, value)
        return d.key.check(out) if d.key.check else out

    def array(self, cls: type[_T], meta: Key, value: object, at: str) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected an array of tables ([[{_header(at)}]])")
        if meta.nonempty and not value:
            self.problems.append(f"{at}: at least one [[{_header(at)}]] is required")
        items = []
        for i, data in enumerate(value):
            try:
                item = self.table(cls, data, f"{at}[{i}]")
            except ValueError as exc:
                self.problems.append(f"{at}[{i}]: {exc}")
            else:
                if item is not None:
                    items.append(item)
        return tuple(items)


def _header(at: str) -> str:
    """The table header of key path ``at``: ``repository[0].s3`` -> ``repository.s3``."""
    return re.sub(r"\[\d+\]", "", at)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _plain(kind: Any, meta: Key, value: object) -> Any:
    """Convert a value without a unit to ``kind``; raise ValueError."""
    optional = get_origin(kind) in (Union, types.UnionType)
    if optional:
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is Literal:
        word = value.lower() if meta.fold_case and isinstance(value, str) else value
        if word not in get_args(kind):
            choices = ", ".join(repr(c) for c in get_args(kind))
            raise ValueError(f"must be one of {choices}; got {value!r}")
        return word
    if get_origin(kind) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("expected a list of non-empty strings")
        return tuple(value)
    if kind is Path:
        if optional and value == "":
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise ValueError(f"must be an absolute path, got {value!r}")
        return Path(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return value


# -- checks between keys -----------------------------------------------------------------

CrossCheck = Callable[[Reader, Any, str], None]
_CROSS_CHECKS: dict[type, list[CrossCheck]] = {}


def cross_check(
    cls: type[_T],
) -> Callable[[Callable[[Reader, _T, str], None]], Callable[[Reader, _T, str], None]]:
    """Register a check that needs several keys of table ``cls`` (run once it is read)."""

    def register(check: Callable[[Reader, _T, str], None]) -> Callable[[Reader, _T, str], None]:
        _CROSS_CHECKS.setdefault(cls, []).append(check)
        return check

    return register
