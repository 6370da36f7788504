#!/usr/bin/env python3
"""Build the proxy-wasm test filters with the pinned AssemblyScript SDK (npm), or check the built ones.

    python tests/wasm/build.py            # rebuild every tests/wasm/<filter>/build/filter.wasm
    python tests/wasm/build.py --check    # rebuild in the cache and compare with the checked-in files

Pinned in package.json / package-lock.json: @solo-io/proxy-runtime 0.1.8 and assemblyscript 0.14.13
(newer compilers reject that SDK). node_modules is kept in a cache folder between runs
($MESHD_WASM_CACHE, default ~/.cache/meshd-wasm-build) and reinstalled (`npm ci`) only when the lock
file changes; each filter is compiled there (beside a copy of tests/wasm/common, the root context they
share) with
`npx asc assembly/index.ts -b build/filter.wasm --use abort=abort_proc_exit --optimize`.
Exit 0: built (or identical); 1: --check found a difference; 2: npm/npx missing or a build failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILTERS = ("headers", "deny", "body", "trap", "loop")
ASC = ["npx", "--no-install", "asc", "assembly/index.ts", "-b", "build/filter.wasm"]
ASC += ["--use", "abort=abort_proc_exit", "--optimize"]


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshd-wasm-build"
    return Path(os.environ.get("MESHD_WASM_CACHE", default))


def run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} (in {cwd}) failed, exit {done.returncode}:\n{done.stdout}{done.stderr}"
        )


def install(cache: Path) -> None:
    """node_modules in the cache, installed from the lock file (again only if the lock file changed)."""
    for tool in ("npm", "npx"):
        if shutil.which(tool) is None:
            print(
                f"{tool} not found: install Node.js and npm (Debian: apt-get install nodejs npm)",
                file=sys.stderr,
            )
            raise SystemExit(2)
    cache.mkdir(parents=True, exist_ok=True)
    lock = (HERE / "package-lock.json").read_bytes()
    cached_lock = cache / "package-lock.json"
    if (cache / "node_modules").is_dir() and cached_lock.exists() and cached_lock.read_bytes() == lock:
        return
    shutil.copy(HERE / "package.json", cache / "package.json")
    cached_lock.write_bytes(lock)
    run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cache)


def build(name: str, cache: Path) -> bytes:
    work = cache / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(cache / "common", ignore_errors=True)
    shutil.copytree(HERE / "common", cache / "common")  # what every filter imports (../../common)
    shutil.copytree(HERE / name / "assembly", work / "assembly")
    (work / "build").mkdir()
    run(ASC, work)
    return (work / "build" / "filter.wasm").read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the checked-in .wasm, write nothing"
    )
    parser.add_argument("filters", nargs="*", default=list(FILTERS), help="which filters (default: all)")
    args = parser.parse_args(argv)
    cache = cache_dir()
    install(cache)
    differ = []
    for name in args.filters:
        built = build(name, cache)
        target = HERE / name / "build" / "filter.wasm"
        if args.check:
            if not target.exists() or target.read_bytes() != built:
                differ.append(name)
            continue
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(built)
        print(f"{target.relative_to(HERE.parent.parent)}: {len(built)} bytes")
    if differ:
        print(
            f"built .wasm differs from the checked-in one: {', '.join(differ)}; run {Path(__file__).name}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
