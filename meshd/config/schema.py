"""TOML tables -> frozen, typed dataclasses, with every problem reported by file and line.

The schema *is* the dataclasses: field types drive conversion, `field(metadata=...)` carries
the TOML name (`toml`) and a one-line description (`doc`). A class may define
`check(self) -> list[Issue]` for rules that span fields. Both the config file and the policy
files go through here, so every user-facing error has the same `FILE:LINE: what (hint)` shape.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from meshd.config.toml_lines import KeyLines
from meshd.errors import ConfigError, Problem
from meshd.units import Address, format_duration, parse_duration, seconds_to_timedelta

T = TypeVar("T")
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Issue:
    """A problem found by a `check()` method, relative to the object checked."""

    path: KeyPath
    message: str
    hint: str | None = None


def toml_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("toml", f.name))


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _is_table(tp: Any) -> bool:
    """A dataclass written as a TOML table (Address is a dataclass too, but written as a string)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and tp is not Address


def describe_type(tp: Any) -> str:
    _optional, tp = _is_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"array of {describe_type(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {describe_type(get_args(tp)[1])}"
    if _is_table(tp):
        return "table"
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "true or false",
        Path: "path string",
        timedelta: 'duration string such as "10s"',
        Address: 'address string "HOST:PORT"',
    }.get(tp, getattr(tp, "__name__", str(tp)))


class _Converter:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.issues: list[Issue] = []

    def fail(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.issues.append(Issue(path, message, hint))

    def value(self, tp: Any, raw: Any, path: KeyPath) -> Any:
        _optional, tp = _is_optional(tp)
        origin = get_origin(tp)
        if _is_table(tp):
            if not isinstance(raw, dict):
                self.fail(path, f"{dotted(path)} must be a table, not {type(raw).__name__}")
                return None
            return self.table(tp, raw, path)
        if origin is tuple:
            (item_tp, *_rest) = get_args(tp)
            if not isinstance(raw, list):
                self.fail(
                    path,
                    f"{dotted(path)} must be an array of {describe_type(item_tp)}",
                    f"write [{_example(item_tp)}]",
                )
                return None
            return tuple(self.value(item_tp, item, (*path, i)) for i, item in enumerate(raw))
        if origin is dict:
            _, item_tp = get_args(tp)
            if not isinstance(raw, dict):
                self.fail(path, f"{dotted(path)} must be a table")
                return None
            return {k: self.value(item_tp, v, (*path, k)) for k, v in raw.items()}
        if origin is Literal:
            choices = get_args(tp)
            if raw not in choices:
                by_case = [c for c in choices if str(c).lower() == str(raw).lower()]
                close = by_case or difflib.get_close_matches(
                    str(raw), [str(c) for c in choices], n=1, cutoff=0.3
                )
                hint = f"did you mean {close[0]!r}?" if close else None
                self.fail(
                    path, f"{dotted(path)} = {raw!r} is not one of {', '.join(map(repr, choices))}", hint
                )
                return None
            return raw
        return self.scalar(tp, raw, path)

    def scalar(self, tp: Any, raw: Any, path: KeyPath) -> Any:
        name = dotted(path)
        if tp is bool:
            if not isinstance(raw, bool):
                self.fail(path, f"{name} must be true or false, not {raw!r}")
                return None
            return raw
        if tp is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.fail(path, f"{name} must be an integer, not {raw!r}", _quoted_number_hint(raw))
                return None
            return raw
        if tp is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                self.fail(path, f"{name} must be a number, not {raw!r}", _quoted_number_hint(raw))
                return None
            return float(raw)
        if tp is str:
            if not isinstance(raw, str):
                self.fail(
                    path, f"{name} must be a string, not {raw!r}", f'write {name.split(".")[-1]} = "{raw}"'
                )
                return None
            return raw
        if tp is Path:
            if not isinstance(raw, str) or not raw:
                self.fail(path, f"{name} must be a non-empty path string, not {raw!r}")
                return None
            try:
                p = Path(raw).expanduser()
            except RuntimeError:  # "~user" for a user that does not exist
                self.fail(path, f"{name}: cannot expand {raw!r} (no such user's home)")
                return None
            # normpath, not resolve(): "../x" reads well in messages, and symlinks stay as written
            return p if p.is_absolute() else Path(os.path.normpath(self.base_dir / p))
        if tp is timedelta:
            try:
                if isinstance(raw, int | float) and not isinstance(raw, bool):
                    return seconds_to_timedelta(raw, raw)
                return parse_duration(str(raw))
            except ValueError as exc:
                self.fail(path, f"{name}: {exc}")
                return None
        if tp is Address:
            try:
                return Address.parse(raw) if isinstance(raw, str) else _raise(f"{raw!r} is not a string")
            except ValueError as exc:
                self.fail(path, f"{name}: {exc}")  # Address.parse's message says what to write
                return None
        raise TypeError(f"schema: no converter for {tp!r}")  # a bug in meshd, not user input

    def table(self, cls: type[T], raw: Mapping[str, Any], path: KeyPath) -> T | None:
        fields = {toml_name(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        ok = True
        for key in raw:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(fields))}"
                where = f" in [{dotted(path)}]" if path else ""
                self.fail((*path, key), f"unknown key {key!r}{where}", hint)
                ok = False
        for name, f in fields.items():
            if name in raw:
                before = len(self.issues)
                kwargs[f.name] = self.value(hints[f.name], raw[name], (*path, name))
                ok = ok and len(self.issues) == before
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                where = f"[{dotted(path)}]" if path else "the top level"
                self.fail(path, f"missing key {name!r} in {where}", f"add {name} = {_example(hints[f.name])}")
                ok = False
        if not ok:
            return None
        obj = cls(**kwargs)
        check: Callable[[], list[Issue]] | None = getattr(obj, "check", None)
        if check is not None:
            for issue in check():
                self.fail((*path, *issue.path), issue.message, issue.hint)
        return obj


def _raise(message: str) -> Any:
    raise ValueError(message)


def _quoted_number_hint(raw: Any) -> str | None:
    if isinstance(raw, str) and raw.strip().lstrip("-").replace(".", "", 1).isdigit():
        return f"remove the quotes: {raw.strip()}"
    return None


def _example(tp: Any) -> str:
    _, tp = _is_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return repr(get_args(tp)[0]).replace("'", '"')
    if origin is tuple:
        return _example(get_args(tp)[0])
    return {int: "7000", bool: "true", float: "1.0", timedelta: '"10s"', Address: '"127.0.0.1:7000"'}.get(
        tp, '"..."'
    )


def parse_toml(text: str, file: str) -> dict[str, Any]:
    """Parse TOML, turning a syntax error into a Problem with the line tomllib reports."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's error has the position only in its text: "... (at line 5, column 8)".
        m = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", str(exc))
        line = int(m.group(2)) if m else None
        msg = f"{m.group(1)} (column {m.group(3)})" if m else str(exc)
        raise ConfigError(
            [Problem(file, line, f"TOML syntax: {msg}", "see toml.io for the syntax")]
        ) from None


def load_document(
    cls: type[T], text: str, file: str, base_dir: Path, *, overrides: Mapping[str, Any] | None = None
) -> T:
    """Parse a TOML document into `cls`; raise ConfigError listing every problem with its line."""
    raw = parse_toml(text, file)
    if overrides:
        raw = merge_overrides(raw, overrides)
    return build(cls, raw, file, base_dir, KeyLines(text))


def build(
    cls: type[T], raw: Mapping[str, Any], file: str, base_dir: Path, lines: KeyLines | None = None
) -> T:
    conv = _Converter(base_dir)
    obj = conv.table(cls, raw, ())
    if conv.issues or obj is None:
        problems = [
            Problem(file, lines.line_of(i.path) if lines else None, i.message, i.hint) for i in conv.issues
        ]
        problems.sort(key=lambda p: p.line or 0)
        raise ConfigError(problems)
    return obj


# ---- KEY=VALUE overrides -------------------------------------------------------------------------


def leaf_keys(cls: type[Any], prefix: str = "") -> dict[str, Any]:
    """Every dotted key reachable through nested tables (not arrays of tables), with its type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + toml_name(f)
        _, tp = _is_optional(hints[f.name])
        if _is_table(tp):
            out.update(leaf_keys(tp, key + "."))
        else:
            out[key] = hints[f.name]
    return out


def parse_override(cls: type[Any], assignment: str) -> tuple[str, Any]:
    """`listen.hbone=0.0.0.0:15008` -> ("listen.hbone", value typed as the key's type, still TOML-shaped)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{assignment!r} is not KEY=VALUE (e.g. role=waypoint)")
    keys = leaf_keys(cls)
    if key not in keys:
        close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}?" if close else "run `meshd config keys` to list them"
        raise ValueError(f"unknown config key {key!r} ({hint})")
    tp = keys[key]
    _optional, inner = _is_optional(tp)
    origin = get_origin(inner)
    text = text.strip()
    try:
        if text.startswith("[") or text.startswith("{") or inner in (int, float, bool):
            value = tomllib.loads(f"v = {text}")["v"]
        elif origin is tuple:
            value = [part.strip() for part in text.split(",") if part.strip()]
            if get_args(inner)[0] is int:
                value = [int(v) for v in value]
        else:
            value = text
    except (tomllib.TOMLDecodeError, ValueError):
        raise ValueError(f"{key}={text!r}: not a valid {describe_type(tp)}") from None
    conv = _Converter(Path.cwd())
    conv.value(tp, value, tuple(key.split(".")))
    if conv.issues:
        raise ValueError(f"{key}={text!r}: {conv.issues[0].message}")
    return key, value


def merge_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for key, value in overrides.items():
        table = out
        *parents, last = key.split(".")
        for part in parents:
            child = table.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            table[part] = child
            table = child
        table[last] = value
    return out


def to_plain(obj: Any) -> Any:
    """A config object as JSON-ready data in the TOML shape (for /config_dump)."""
    if isinstance(obj, Path | Address):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {toml_name(f): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, timedelta):
        return format_duration(obj)
    return obj
