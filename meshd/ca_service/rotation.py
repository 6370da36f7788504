"""Trust-bundle rotation of a CA folder, in three steps that never leave a node unable to verify a peer.

1. `prepare`: a new root is made in `next/` (key and certificate). The bundle becomes old + new; the
   old root still signs. Wait until every node has fetched the bundle (`identity.bundle_refresh`).
2. `activate`: the new root becomes `ca.crt`/`ca.key` and signs from now on; the old certificate moves
   to `previous/` (its key is deleted). The bundle is still old + new, so certificates of either root
   verify; nodes get new-root certificates as they renew or restart.
3. `retire`: `previous/` is removed; the bundle is the new root only. Do it once every certificate
   from the old root has been renewed (at most one certificate lifetime after `activate`).
Open connections are never affected: a bundle change only applies to TLS contexts built afterwards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from meshd.identity.ca import CA_CERT_FILE, CA_KEY_FILE, NEXT_DIR, PREVIOUS_DIR, CAError, LocalCA


def prepare(directory: Path) -> LocalCA:
    current = LocalCA.load(directory)
    if (directory / NEXT_DIR).exists():
        raise CAError(f"a rotation is already prepared in {directory / NEXT_DIR} (activate it, or delete it)")
    if (directory / PREVIOUS_DIR).exists():
        raise CAError(
            f"the previous root in {directory / PREVIOUS_DIR} is not retired yet (meshd ca rotate retire)"
        )
    return LocalCA.init(directory / NEXT_DIR, current.trust_domain)


def activate(directory: Path) -> LocalCA:
    nxt = directory / NEXT_DIR
    if not nxt.is_dir():
        raise CAError(f"no prepared root in {nxt} (run `meshd ca rotate prepare --dir {directory}` first)")
    new = LocalCA.load(nxt)
    old = LocalCA.load(directory)
    if new.trust_domain != old.trust_domain:
        raise CAError(f"{nxt} is for trust domain {new.trust_domain!r}, not {old.trust_domain!r}")
    prev = directory / PREVIOUS_DIR
    prev.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(directory / CA_CERT_FILE, prev / CA_CERT_FILE)
    # Key first, then certificate: a reader in between sees a mismatch (an error, retried), never a
    # certificate signed by one key under the other root's name.
    os.replace(nxt / CA_KEY_FILE, directory / CA_KEY_FILE)
    os.replace(nxt / CA_CERT_FILE, directory / CA_CERT_FILE)
    shutil.rmtree(nxt)
    return new


def retire(directory: Path) -> None:
    prev = directory / PREVIOUS_DIR
    if not prev.is_dir():
        raise CAError(f"no previous root to retire in {directory}")
    shutil.rmtree(prev)
