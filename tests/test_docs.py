"""The repository explains itself: every reference into docs/ resolves, none points outside.

Three checks over every tracked text file (``git ls-files``; PNGs and other binary files, and
the Locust page vendored as the example load-test report, are skipped):

- no reference to the product brief the project was built from, or to its seed documents:
  they are not in the repository, so a newcomer could not follow one;
- every ``docs/<page>.md`` and ``docs/<page>.md#<anchor>`` names an existing page and, with an
  anchor, one of its headings (GitHub's slugs); inside docs/ the relative links too;
- every "invariant I<n>" names a ``## I<n>.`` heading of docs/invariants.md and every
  "target T<n>" (and, in bench/ and docs/, every "T<n>.") a ``## T<n>.`` heading of
  docs/performance.md.

Each failure lists ``file:line`` and the offending text of every bad reference.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The Locust page of the committed example run: Locust's own HTML and scripts, not our text.
VENDORED = frozenset({"loadtests/reports/example-spike.html"})
BINARY_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".ico", ".pdf", ".gz", ".zip"})

# Spelled in two parts so that this file does not match itself.
OUTSIDE = re.compile(r"\b" + "SP" + r"EC\b|" + "seed" + r" 00|" + "seeds" + "/")
DOC_REF = re.compile(r"(?<![\w/.-])docs/([\w./-]*?\.md)(?:#([\w-]+))?")
RELATIVE_LINK = re.compile(r"\]\(([\w-]+\.md)?(?:#([\w-]+))?\)")
# "invariant I3", "invariants I1 and I2", "targets T1-T3" (an en dash too).
_MORE = r"(?:\s*(?:,|and|or|to|-|\u2013)\s*{0}\d+)*"
INVARIANTS = re.compile(r"\binvariants?\s+(I\d+" + _MORE.format("I") + ")", re.I)
TARGETS = re.compile(r"\btargets?\s+(T\d+" + _MORE.format("T") + ")", re.I)
TARGET_DOT = re.compile(r"\bT(\d+)\.(?=\s|$)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")

Line = tuple[str, int, str]  # path relative to the root, line number, text


@cache
def tracked_text() -> tuple[Line, ...]:
    """Every line of every tracked text file."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    lines: list[Line] = []
    for name in sorted(filter(None, listed.split("\0"))):
        path = ROOT / name
        if name in VENDORED or path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        text = data.decode("utf-8", errors="replace")
        lines += [(name, n, line) for n, line in enumerate(text.splitlines(), 1)]
    return tuple(lines)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation but '-' and '_'
    dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def headings(page: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """The anchors of docs/<page> (duplicates numbered as GitHub does) and its raw headings."""
    anchors: set[str] = set()
    raw: list[str] = []
    seen: dict[str, int] = {}
    in_code = False
    for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match is None:
            continue
        raw.append(line)
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return frozenset(anchors), tuple(raw)


def page_exists(page: str) -> bool:
    path = (DOCS / page).resolve()
    return path.is_relative_to(DOCS) and path.is_file()


def bad_link(page: str, anchor: str | None) -> str | None:
    """Why docs/<page>#<anchor> does not resolve, or None when it does."""
    if not page_exists(page):
        return f"no page docs/{page}"
    if anchor and anchor not in headings(page)[0]:
        return f"no heading #{anchor} in docs/{page}"
    return None


def numbered(page: str, letter: str) -> frozenset[str]:
    """The numbers N of the ``## <letter>N.`` headings of docs/<page>."""
    if not page_exists(page):
        return frozenset()
    pattern = re.compile(rf"^##\s+{letter}(\d+)\.")
    return frozenset(m.group(1) for h in headings(page)[1] if (m := pattern.match(h)))


def report(problems: list[str]) -> str:
    return f"{len(problems)} bad reference(s):\n" + "\n".join(problems)


def in_docs(name: str) -> bool:
    return name.startswith("docs/")


def test_no_reference_outside_the_repository() -> None:
    problems = [
        f"{name}:{n}: {line.strip()}" for name, n, line in tracked_text() if OUTSIDE.search(line)
    ]
    assert not problems, report(problems)


def doc_links(name: str, line: str) -> Iterator[tuple[str, str | None]]:
    """(page, anchor) of every docs/ reference on the line, relative links inside docs/."""
    for match in DOC_REF.finditer(line):
        yield match.group(1), match.group(2)
    if in_docs(name) and name.endswith(".md"):
        here = Path(name).parent.relative_to("docs")
        for match in RELATIVE_LINK.finditer(line):
            yield str(here / (match.group(1) or Path(name).name)), match.group(2)


def test_every_docs_reference_resolves() -> None:
    problems = []
    for name, n, line in tracked_text():
        for page, anchor in doc_links(name, line):
            why = bad_link(page, anchor)
            if why:
                problems.append(f"{name}:{n}: {why}: {line.strip()}")
    assert not problems, report(problems)


@pytest.mark.parametrize(
    ("pattern", "page", "letter", "everywhere"),
    [
        (INVARIANTS, "invariants.md", "I", True),
        (TARGETS, "performance.md", "T", True),
        (TARGET_DOT, "performance.md", "T", False),
    ],
    ids=["invariant I<n>", "target T<n>", "T<n>. in bench and docs"],
)
def test_every_numbered_reference_has_its_heading(
    pattern: re.Pattern[str], page: str, letter: str, everywhere: bool
) -> None:
    known = numbered(page, letter)
    problems = []
    for name, n, line in tracked_text():
        if not everywhere and not name.startswith(("bench/", "docs/")):
            continue
        for match in pattern.finditer(line):
            missing = [w for w in re.findall(r"\d+", match.group(1)) if w not in known]
            if missing:
                names = ", ".join(f"{letter}{w}" for w in missing)
                problems.append(f"{name}:{n}: no '## {names}.' in docs/{page}: {line.strip()}")
    assert not problems, report(problems)
