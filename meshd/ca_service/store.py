"""The CA service's state, kept beside the root in the CA folder.

- `token.key`: 32 random bytes (0600), the HMAC key of enrollment tokens. Made by the first `meshd ca token`.
- `ca-state.json`: which tokens were used (until they expire) and the node table: for each enrolled
  node its authorized workloads (from its token) and whether it is revoked.

The CLI (`meshd ca token`, `meshd ca revoke`) and the daemon both write the state file, so every
change is a read-modify-write under an exclusive `flock` on `ca-state.lock`, written through a
temporary file renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.identity.ca import CAError, _write_file

TOKEN_KEY_FILE = "token.key"
STATE_FILE = "ca-state.json"
LOCK_FILE = "ca-state.lock"


@dataclass
class NodeRecord:
    workloads: list[str] = field(default_factory=list)
    revoked: bool = False
    enrolled_at: str | None = None


@dataclass
class CaState:
    used_tokens: dict[str, int] = field(default_factory=dict)  # token id -> expiry (unix seconds)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CaState:
        nodes = {
            name: NodeRecord(
                workloads=[str(w) for w in rec.get("workloads", [])],
                revoked=bool(rec.get("revoked", False)),
                enrolled_at=rec.get("enrolled_at"),
            )
            for name, rec in raw.get("nodes", {}).items()
        }
        used = {str(k): int(v) for k, v in raw.get("used_tokens", {}).items()}
        return cls(used_tokens=used, nodes=nodes)

    def to_json(self) -> dict[str, Any]:
        return {
            "used_tokens": self.used_tokens,
            "nodes": {
                n: {"workloads": r.workloads, "revoked": r.revoked, "enrolled_at": r.enrolled_at}
                for n, r in sorted(self.nodes.items())
            },
        }


class CaStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def token_key(self, *, create: bool = False) -> bytes:
        path = self.directory / TOKEN_KEY_FILE
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            if not create:
                raise CAError(
                    f"{path} does not exist: no token was ever made (run `meshd ca token --dir {self.directory}`)"
                ) from None
            with self._lock(), self._os_errors(path):
                if not path.exists():
                    _write_file(path, secrets.token_bytes(32), 0o600)
                key = path.read_bytes()
        except OSError as exc:
            raise CAError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if len(key) < 32:
            raise CAError(f"{path} is too short to be a token key (delete it; old tokens stop working)")
        return key

    def read(self) -> CaState:
        try:
            raw = json.loads((self.directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return CaState()
        except (OSError, ValueError) as exc:
            raise CAError(
                f"cannot read {self.directory / STATE_FILE}: {exc} (restore it from backup)"
            ) from None
        return CaState.from_json(raw)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[CaState]:
        """Read, let the caller change, write back: all under the lock. An exception writes nothing."""
        with self._lock():
            state = self.read()
            yield state
            data = json.dumps(state.to_json(), indent=2).encode() + b"\n"
            with self._os_errors(self.directory / STATE_FILE):
                _write_file(self.directory / STATE_FILE, data, 0o600)

    @contextlib.contextmanager
    def _os_errors(self, path: Path) -> Iterator[None]:
        """An OS error writing the CA folder (read-only, full, not ours) as a CAError with its cause."""
        try:
            yield
        except OSError as exc:
            raise CAError(
                f"cannot write {exc.filename or path}: {exc.strerror or exc} (meshd must be able to write "
                f"the CA folder {self.directory}: under systemd keep it below /var/lib/meshd, "
                "or list it in the unit's ReadWritePaths=)"
            ) from exc

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if not self.directory.is_dir():
            raise CAError(f"CA directory {self.directory} does not exist (meshd ca init --dir ...)")
        with self._os_errors(self.directory / LOCK_FILE):
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
