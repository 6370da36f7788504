"""Problems found in user input, reported as `FILE:LINE: what is wrong (what to do)`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None
    message: str
    hint: str | None = None

    def format(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}: {self.message}{hint}"

    def __str__(self) -> str:
        return self.format()


class ConfigError(Exception):
    """One or more problems in a config or policy file; nothing from it was applied."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(p.format() for p in self.problems))


class UserFacingError(Exception):
    """A failure whose message is written for the user (what is wrong, what to do); shown without traceback."""
