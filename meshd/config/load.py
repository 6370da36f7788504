"""Finding and loading the config file (plus KEY=VALUE overrides)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshd.config.model import Config
from meshd.config.schema import load_document, parse_override
from meshd.errors import ConfigError, Problem

DEFAULT_CONFIG = Path("/etc/meshd/meshd.toml")


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """-c FILE, else $MESHD_CONFIG, else /etc/meshd/meshd.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MESHD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> typed values; ConfigError naming every bad one."""
    out: dict[str, Any] = {}
    problems = []
    for text in assignments:
        try:
            key, value = parse_override(Config, text)
        except ValueError as exc:
            problems.append(Problem("command line", None, str(exc)))
            continue
        out[key] = value
    if problems:
        raise ConfigError(problems)
    return out


def load_config(path: Path, overrides: Sequence[str] = ()) -> Config:
    """Read and validate the config file; raise ConfigError with every problem found."""
    typed_overrides = parse_overrides(overrides)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                Problem(
                    str(path),
                    None,
                    "config file not found",
                    "pass -c FILE, set MESHD_CONFIG, or see configs/",
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(path), None, f"cannot read config file: {exc}")]) from None
    return load_document(Config, text, str(path), path.resolve().parent, overrides=typed_overrides)
