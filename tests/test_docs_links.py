"""The user documentation holds together: every relative Markdown link in README.md and
docs/*.md names a file that exists and, with a #fragment, a heading that GitHub renders
with that anchor; the README stays a short front page whose first lines are the two
commands (the test command is what CI runs, .ci/run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks (a `# comment` in a shell block is no heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text, lower case,
    punctuation dropped (letters, digits, '_', '-' and spaces kept), spaces as '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings get; a repeated heading gets -1, -2… as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for match in HEADING.finditer(_prose(page.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The targets of a page's Markdown links, outside code."""
    prose = CODE_SPAN.sub("", _prose(page.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(prose)]


def broken(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: {target}: no file {dest.relative_to(root)}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{page.name}: {target}: no heading with anchor #{fragment} "
                            f"in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken(page) == []


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    """The check itself: a wrong anchor, a missing file and a heading inside a code block
    are caught; GitHub's slugs for punctuation, code and repeated headings are matched."""
    (tmp_path / "other.md").write_text("# Other\n\n## Exit codes\n\n## Exit codes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Scaling out: PostgreSQL and many `collectors`\n\n"
        "```sh\n# not a heading\n```\n\n"
        "[ok](#scaling-out-postgresql-and-many-collectors) [ok](other.md#exit-codes-1)\n"
        "[bad](#not-a-heading) [bad](other.md#exit-code) [bad](missing.md)\n"
        "`[code](#ignored)` [web](https://example.net/#x)\n")
    problems = broken(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert [p.split(": ")[1] for p in problems] == ["#not-a-heading", "other.md#exit-code",
                                                     "missing.md"]


def test_readme_is_a_short_front_page() -> None:
    """The README is a front page: the two set-up commands first, then what bbprobe is,
    a first five minutes per reader, and the docs index; the rest lives in docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"
    first_block = _first_code_block(text)
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for reader in ("technician", "operator", "analyst", "developer"):
        assert f"(docs/{reader}.md)" in text, reader
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{doc.name})" in text, f"the docs index misses {doc.name}"


def _first_code_block(text: str) -> list[str]:
    match = FENCE.search(text)
    assert match is not None
    return match.group(0).splitlines()[1:-1]
