"""The documentation checked against the code: commands, cited sections, settings and links."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from embedseg_service.records.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *DOCS]
CITATION = re.compile(r"docs/method\.md §(\d+(?:\.\d+)*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]


def test_readme_test_command_is_the_ci_command() -> None:
    """The README's test command is the last line of ``.ci/run`` in the virtual environment it makes."""
    lines = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert "python3 -m venv .venv" in lines and ". .venv/bin/activate" in lines
    ci_command = "python3 -m venv .venv && . .venv/bin/activate && " + lines[-1]
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert any(line == ci_command for block in blocks for line in block.splitlines()), ci_command


def test_every_method_section_the_code_cites_exists() -> None:
    numbers = {heading.split()[0].rstrip(".") for heading in _headings(ROOT / "docs" / "method.md")}
    cited: dict[str, set[str]] = {}
    for path in [*(ROOT / "embedseg_service").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for section in CITATION.findall(path.read_text()):
            cited.setdefault(section, set()).add(str(path.relative_to(ROOT)))
    assert cited, "no citation of docs/method.md found"
    missing = {section: sorted(paths) for section, paths in cited.items() if section not in numbers}
    assert not missing, f"sections cited but absent from docs/method.md: {missing}"


def _expected_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def test_configuration_page_lists_every_setting_with_its_default() -> None:
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`EMBEDSEG_"):
            rows[cells[0].strip("`")] = cells[1]
    fields = Settings.model_fields
    assert set(rows) == {f"EMBEDSEG_{name.upper()}" for name in fields}
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        cell = rows[f"EMBEDSEG_{name.upper()}"]
        assert _expected_default(default) in cell, (name, default, cell)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_local_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in {_slug(h) for h in _headings(linked)}, f"{page.name}: no heading for #{anchor}"


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MAX_IMAGE_BYTES = 300_000


def test_readme_images_exist_and_are_small_pngs() -> None:
    """The README's screenshots (``--readme-screenshots`` rewrites them): each a PNG under docs/images, at most
    :data:`MAX_IMAGE_BYTES` bytes."""
    images = IMAGE.findall((ROOT / "README.md").read_text())
    assert len(images) >= 2, images
    for target in images:
        path = (ROOT / target).resolve()
        assert path.parent == ROOT / "docs" / "images", target
        assert path.is_file(), f"README.md shows {target}, which does not exist"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not a PNG"
        assert len(data) <= MAX_IMAGE_BYTES, f"{target} has {len(data)} bytes; quantise it (--readme-screenshots)"
