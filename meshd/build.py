"""Which build of meshd is running: the pure-Python one, or the one with a compiled core.

Must never know: anything else. `scripts/compile_core.py` compiles COMPILED_MODULES with mypyc (the
.deb does); the .py files stay, so the same tree runs pure wherever the .so files are absent.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

# The pure modules where the CPU per request goes: the node data path, and the waypoint's request
# path (its HTTP/1.1 front-end and upstream stay interpreted: they use async generators, which mypyc
# does not compile).
COMPILED_MODULES = (
    "meshd.hbone.connection",
    "meshd.hbone.events",
    "meshd.hbone.wire",
    "meshd.hbone._link",
    "meshd.hbone.stream",
    "meshd.dataplane.pump",
    "meshd.node.tcp",
    "meshd.waypoint.http1",
    "meshd.waypoint.pipeline",
    "meshd.waypoint.backends",
    "meshd.waypoint.router",
    "meshd.waypoint.admission",
)


def compiled_modules() -> list[str]:
    """The modules of COMPILED_MODULES that load from a compiled extension here."""
    out = []
    for name in COMPILED_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            out.append(name)
    return out


def describe() -> str:
    """`compiled core, 7 of 7 modules`, or `pure Python`."""
    done = compiled_modules()
    return f"compiled core, {len(done)} of {len(COMPILED_MODULES)} modules" if done else "pure Python"
