"""Where a key was written in a TOML document.

tomllib gives positions only for syntax errors; schema errors need them too. This is a small
line scanner (not a parser: the document has already parsed) that records the line of every
table header, key and multi-line array element, by the same path the schema walker uses:
strings for keys, integers for array-of-tables and array indices.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(text: str) -> list[str] | None:
    """Split a (possibly dotted, possibly quoted) TOML key; None if it is not one."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return None
        if text[i] in "\"'":
            quote = text[i]
            end = text.find(quote, i + 1)
            if end < 0:
                return None
            parts.append(text[i + 1 : end])
            i = end + 1
        else:
            m = _BARE_KEY.match(text, i)
            if not m:
                return None
            parts.append(m.group())
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n:
            if text[i] != ".":
                return None
            i += 1
    return parts or None


class KeyLines:
    """Map of TOML key paths to the 1-based line where each was written."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        self._array_counts: dict[Path, int] = {}
        self._scan(text)

    def line_of(self, path: Path) -> int | None:
        """The line of the path, or of its nearest written ancestor."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    def _resolve(self, keys: list[str]) -> Path:
        # A header's dotted parts go through the latest element of any array of tables on the way.
        resolved: list[str | int] = []
        for key in keys:
            resolved.append(key)
            count = self._array_counts.get(tuple(resolved))
            if count is not None:
                resolved.append(count - 1)
        return tuple(resolved)

    def _scan(self, text: str) -> None:
        table: Path = ()
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            lineno = i + 1
            line = lines[i].strip()
            i += 1
            if not line or line.startswith("#"):
                continue
            if line.startswith("[["):
                end = line.find("]]")
                keys = _split_key(line[2:end]) if end > 0 else None
                if keys:
                    parent = self._resolve(keys[:-1])
                    array_path = (*parent, keys[-1])
                    self._array_counts[array_path] = self._array_counts.get(array_path, 0) + 1
                    table = (*array_path, self._array_counts[array_path] - 1)
                    self.lines.setdefault(array_path, lineno)
                    self.lines[table] = lineno
                continue
            if line.startswith("["):
                end = line.find("]")
                keys = _split_key(line[1:end]) if end > 0 else None
                if keys:
                    table = self._resolve(keys)
                    self.lines[table] = lineno
                continue
            eq = _find_equals(line)
            if eq < 0:
                continue
            keys = _split_key(line[:eq])
            if not keys:
                continue
            key_path = (*table, *keys)
            self.lines[key_path] = lineno
            i = self._scan_value(lines, i - 1, line[eq + 1 :], key_path)

    def _scan_value(self, lines: list[str], index: int, value: str, key_path: Path) -> int:
        """Walk a value that may span lines; record array elements' lines. Returns the next line index."""
        depth = 0
        element = -1
        quote: str | None = None
        text = value
        row = index
        while True:
            j = 0
            while j < len(text):
                ch = text[j]
                if quote:
                    if text.startswith(quote, j):
                        j += len(quote)
                        quote = None
                        continue
                    if ch == "\\" and quote in ('"', '"""'):
                        j += 2
                        continue
                    j += 1
                    continue
                if ch == "#":
                    break
                if text.startswith('"""', j) or text.startswith("'''", j):
                    quote = text[j : j + 3]
                    j += 3
                    continue
                if depth == 1 and ch not in " \t,]" and (element < 0 or _starts_element(text, j)):
                    element += 1
                    self.lines.setdefault((*key_path, element), row + 1)
                if ch in "\"'":
                    quote = ch
                elif ch in "[{":
                    depth += 1
                elif ch in "]}":
                    depth -= 1
                j += 1
            row += 1
            if (depth <= 0 and quote not in ('"""', "'''")) or row >= len(lines):
                return row
            text = lines[row]


def _starts_element(text: str, j: int) -> bool:
    """At array depth 1, does position j begin a new element (previous non-space is ',' or '[')?"""
    k = j - 1
    while k >= 0 and text[k] in " \t":
        k -= 1
    return k < 0 or text[k] in ",["


def _find_equals(line: str) -> int:
    quote: str | None = None
    for j, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "=":
            return j
    return -1
