"""README, CONTRIBUTING.md and docs/: every relative link and image resolves, every parameter
table agrees with MLproject, and README stays a five-minute read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md"]
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.M | re.S)


def text_of(page: Path) -> str:
    return CODE_BLOCK.sub("", page.read_text())


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", text_of(page), re.M)}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(text_of(page)) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {path}"


def test_the_link_check_sees_links_and_images():
    links = relative_links(ROOT / "README.md")
    assert "docs/parameters.md" in links and any(t.endswith(".png") for t in links)
    assert "rollback-promotion-and-the-alias-history" in anchors(ROOT / "docs/parameters.md")


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(t.partition("#")[0]).name for t in relative_links(ROOT / "README.md")}
    assert {p.name for p in PAGES[1:]} <= linked


def table_rows(page: Path, header: str) -> list[list[str]]:
    """The rows of every table in ``page`` whose header row starts with ``header``."""
    rows, inside = [], False
    for line in page.read_text().splitlines():
        if line.startswith(header):
            inside = True
        elif inside and line.startswith("|"):
            if not line.startswith("| ---"):
                rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            inside = False
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def declared_default(entry_point: str, name: str) -> str | None:
    spec = ENTRY_POINTS[entry_point]["parameters"][name]
    return str(spec["default"]) if "default" in spec else None


def test_the_parameter_tables_in_docs_match_mlproject():
    documented: dict[str, dict[str, str]] = {}
    tables = [p for p in PAGES if table_rows(p, "| entry point | parameter | default |")]
    assert tables, "no parameter table found"
    for page in tables:
        entry = None
        for cells in table_rows(page, "| entry point | parameter | default |"):
            entry = names(cells[0])[0] if cells[0] else entry
            params, default = names(cells[1]), cells[2]
            defaults = [d.strip().strip("`") for d in default.split(",")]
            for i, name in enumerate(params):
                assert name not in documented.setdefault(entry, {}), (entry, name)
                if default.startswith("as `"):  # "as `train`": the same default there
                    other = names(default)[0]
                    value = declared_default(other, name)
                else:
                    value = defaults[i] if len(defaults) == len(params) else defaults[0]
                    value = {"empty": "", "required": None}.get(value, value)
                assert value == declared_default(entry, name), (page.name, entry, name)
                documented[entry][name] = value
    assert set(documented) == set(ENTRY_POINTS)
    for entry, params in documented.items():
        assert set(params) == set(ENTRY_POINTS[entry]["parameters"]), entry


def test_the_readme_entry_point_table_matches_mlproject():
    rows = table_rows(ROOT / "README.md", "| entry point | main parameters |")
    assert {names(cells[0])[0] for cells in rows} == set(ENTRY_POINTS)
    for cells in rows:
        entry = names(cells[0])[0]
        for item in names(cells[1]):
            name, eq, value = item.partition("=")
            assert name in ENTRY_POINTS[entry]["parameters"], (entry, name)
            assert (value if eq else None) == declared_default(entry, name), (entry, name)
