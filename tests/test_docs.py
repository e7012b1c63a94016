"""The docs say what the tree holds: docs/architecture.md's layout names every module and
only modules that exist, README.md stays short, and every relative link leads to a file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "workers", "gateway", "client")
TOP_MODULES = ("beat_schedule.py",)
README_MAX_LINES = 150
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def modules_in_tree(root: Path) -> set[str]:
    """Every .py module under the packages, and the top-level modules, as paths."""
    found = {name for name in TOP_MODULES if (root / name).is_file()}
    for package in PACKAGES:
        found |= {
            path.relative_to(root).as_posix()
            for path in (root / package).rglob("*.py")
            if "__pycache__" not in path.parts
        }
    return found


def layout_block(architecture: str) -> str:
    """The code block of the "### Layout" section."""
    section = architecture.split("\n### Layout\n", 1)[1].split("\n#", 1)[0]
    return section.split("```", 2)[1]


def modules_in_layout(block: str) -> set[str]:
    """The .py paths a layout tree names: each line's first word, under the directories
    (`name/`) that enclose it by indentation."""
    named: set[str] = set()
    parents: list[tuple[int, str]] = []  # (indent, directory path), innermost last
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        word = line.split()[0].rstrip(",")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + word
        if word.endswith("/"):
            parents.append((indent, path))
        elif word.endswith(".py"):
            named.add(path)
    return named


def layout_mismatch(tree: set[str], layout: set[str]) -> str:
    """'' when they agree, else the modules the layout misses and those it names in vain."""
    missing, extra = sorted(tree - layout), sorted(layout - tree)
    parts = []
    if missing:
        parts.append("modules missing from docs/architecture.md's layout: " + ", ".join(missing))
    if extra:
        parts.append("modules the layout names that do not exist: " + ", ".join(extra))
    return "; ".join(parts)


def test_the_layout_names_every_module_and_only_those() -> None:
    layout = modules_in_layout(layout_block((ROOT / "docs/architecture.md").read_text()))
    mismatch = layout_mismatch(modules_in_tree(ROOT), layout)
    assert mismatch == "", mismatch


def test_the_layout_check_reports_exactly_the_missing_and_the_extra() -> None:
    # Given a layout tree that misses one module and names one that does not exist
    block = (
        "router/                 decisions\n"
        "  policy.py             route()\n"
        "  gone.py               removed\n"
        "workers/\n"
        "  state/\n"
        "    keys.py             every key\n"
        "  cli.py                the command\n"
        "beat_schedule.py        entries\n"
        "compose.yaml, Dockerfile   not modules\n"
    )
    layout = modules_in_layout(block)
    assert layout == {
        "router/policy.py",
        "router/gone.py",
        "workers/state/keys.py",
        "workers/cli.py",
        "beat_schedule.py",
    }
    tree = {
        "router/policy.py",
        "router/jobs.py",
        "workers/state/keys.py",
        "workers/cli.py",
        "beat_schedule.py",
    }

    # When they are compared, then the message names those two and nothing else
    assert layout_mismatch(tree, layout) == (
        "modules missing from docs/architecture.md's layout: router/jobs.py; "
        "modules the layout names that do not exist: router/gone.py"
    )
    assert layout_mismatch(tree, tree) == ""


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a Markdown file that lead to no file or directory, each named
    with the file's path from `root`."""
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same file
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(f"{doc.relative_to(root)}: {target}")
    return broken


def test_every_relative_link_leads_to_a_file() -> None:
    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "tests/chaos/README.md"]
    docs += sorted((ROOT / "docs").glob("*.md"))
    broken = [link for doc in docs for link in broken_links(doc)]
    assert broken == []


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    # Given a document with a good link, a URL, an anchor and a link to nothing
    (tmp_path / "there.md").write_text("")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](there.md#x) [b](https://example.com) [c](#top) [d](missing.md)")

    # Then only the last is broken
    assert broken_links(doc, tmp_path) == ["doc.md: missing.md"]
