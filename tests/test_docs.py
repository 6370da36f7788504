"""The docs stand on their own: no pointer outside the repository, links that resolve, and the
catalog page documents every field meshd puts in a catalog."""

from __future__ import annotations

import json
import re
import subprocess

from meshd.discovery.catalog import NodeCatalog, ServiceEntry, ServicePortEntry, WorkloadEntry
from meshd.units import Address
from tests.support.paths import REPO


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [
        p for p in out.splitlines() if p.endswith((".md", ".py", ".toml", ".sh", ".service", ".js", ".txt"))
    ]


# Assembled, so that this file does not itself read as a pointer outside the repository.
NEEDLES = ("DESIGN" + ".md", ".." + "/shared", "/work" + "/shared")


def test_nothing_points_at_a_design_file_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        text = (REPO / path).read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in NEEDLES):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


def test_docs_links_resolve() -> None:
    missing = []
    for path in ["README.md", *(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]:
        text = (REPO / path).read_text()
        base = (REPO / path).parent
        for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
            if not (base / target).exists():
                missing.append(f"{path}: {target}")
        for target in re.findall(r"\bdocs/[a-z-]+\.md\b", text):
            if not (REPO / target).exists():
                missing.append(f"{path}: {target}")
    assert missing == []


def _keys(value: object, prefix: str = "") -> set[str]:
    """Every field path of a JSON value: `workloads[].labels`, `services[].ports`..."""
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(prefix + k)
            if k != "labels":  # a free-form map, not fields
                out |= _keys(v, prefix + k + ".")
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        out |= _keys(value[0], prefix[:-1] + "[].")
    return out


def test_catalog_page_documents_every_field_meshd_serves() -> None:
    cat = NodeCatalog(
        "beta",
        "home.arpa",
        "node",
        Address.parse("0.0.0.0:15008"),
        (WorkloadEntry("beta", "w", "default", "w", "10.0.0.3", (80,), ("s.default",), (("app", "w"),)),),
        (ServiceEntry("s", "default", (ServicePortEntry(80, 8080, "http"),), "wp"),),
        (("apps", "wp"),),
    )
    served = _keys(json.loads(cat.encode()))
    page = (REPO / "docs" / "catalog.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)`", page, re.MULTILINE))
    assert served - documented == set()
    for fact in ("node.meshd.internal", "x-meshd-revision", "/meshd/v1/catalog", "4 MiB", "403"):
        assert fact in page
