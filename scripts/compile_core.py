"""Compile meshd's hot pure modules with mypyc, in place, in a tree that holds a `meshd/` package.

    python scripts/compile_core.py DIR      # DIR/meshd/... gets .so files beside the .py files

The modules (meshd/build.py COMPILED_MODULES) are the node data path (HBONE connection, wire, link,
tunnel stream; the pump and the TCP legs) and the waypoint's request path (HTTP/1.1 parsing, the
pipeline, backends, routes, admission). What it saves is in bench/README.md ("The compiled core: kept";
"Plain DATA, the collector and a larger compiled core"). Python imports an
extension module before the .py of the same name, and the .py files stay, so a tree without the .so
files is the pure build. Without a C compiler, Python's headers or mypyc, this says why and leaves the
tree pure (exit 0): meshd works the same either way, only slower.

Never run it on a checkout you edit: the .so files would shadow your edits (`make test-compiled`
compiles a copy under build/).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# One list: the build of the .deb, `make test-compiled` and `meshd version` read it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshd.build import COMPILED_MODULES


def why_not() -> str | None:
    """Why this machine cannot compile (None if it can)."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy: pip install mypy)"
    if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")):
        return "no C compiler (Debian: apt-get install gcc)"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers in {include} (Debian: apt-get install python3-dev)"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    tree = Path(argv[0]).resolve()
    if not (tree / "meshd" / "__init__.py").exists():
        print(f"compile_core: {tree} holds no meshd package", file=sys.stderr)
        return 2
    reason = why_not()
    if reason is not None:
        print(f"compile_core: not compiling, the pure-Python build stays: {reason}")
        return 0
    paths = [m.replace(".", "/") + ".py" for m in COMPILED_MODULES]
    env = {**os.environ, "MYPYC_OPT_LEVEL": os.environ.get("MYPYC_OPT_LEVEL", "3")}
    # mypyc compiles in a scratch copy of the package: the tree may be a site-packages whose other
    # top-level modules (typing_extensions.py ...) mypy would take for ours, and its build files stay
    # out of what is shipped. The extensions it writes (beside each module, and its shared
    # <hash>__mypyc library at the top) are then moved into the tree.
    with tempfile.TemporaryDirectory(prefix="compile_core.") as scratch:
        work = Path(scratch)
        shutil.copytree(tree / "meshd", work / "meshd", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        result = subprocess.run(
            [sys.executable, "-m", "mypyc", *paths], cwd=work, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            print(result.stdout[-4000:] + result.stderr[-4000:], file=sys.stderr)
            print("compile_core: mypyc failed (above); nothing was changed", file=sys.stderr)
            return 1
        for so in [*work.glob("*.so"), *work.glob("meshd/**/*.so")]:
            shutil.copy2(so, tree / so.relative_to(work))
    print(f"compile_core: compiled {len(COMPILED_MODULES)} modules in {tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
