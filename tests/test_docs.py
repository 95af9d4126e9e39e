"""Citations in the repository lead somewhere a maintainer can follow: no design document that is not
in the repository, every `docs/<page>.md` link (with its `#anchor` or `, "Heading"`) exists, and every
section sign outside docs/ belongs to an RFC or draft citation."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN_NAMES = (
    "ARCHITECTURE",
    "transport",
    "harmony",
    "discord-gateway",
    "performance",
    "testing",
    "cluster",
)
# A design-file name, with the path written before it if any (`docs/harmony.md` is a page of ours).
DESIGN_CITATION = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*(?:" + "|".join(DESIGN_NAMES) + r")\.md)")
DOCS_LINK = re.compile(r"(?<![\w./-])docs/([\w/-]+\.md)(?:#([\w-]+)|, \"([^\"\n]+)\")?")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
SECTION = "\N{SECTION SIGN}"
# An RFC or draft citation and the sections it names: `RFC 8285 <S>4.2, <S>4.3`, `RFC 5246 <S>7.2.1 and
# <S>7.4`, also when a line break (and its comment marker) falls between the RFC number and a section.
_GAP = r"[\s#*/]*"
_REF = SECTION + r" ?[\w.]+"
RFC_SECTIONS = re.compile(rf"(?:RFC ?\d+|draft-[\w.-]+){_GAP}{_REF}(?:(?:,|\s+and|\s+or|/){_GAP}{_REF})*")


def tracked_text_files() -> list[tuple[str, str]]:
    """(path, text) of every file git tracks that decodes as UTF-8."""
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.split(b"\0")
    out = []
    for name in filter(None, names):
        path = ROOT / name.decode()
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        try:
            out.append((name.decode(), path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def missing_design_citations(files: list[tuple[str, str]], root: Path) -> list[str]:
    """`path:line: citation` for each design-file name that exists neither from the repository's
    root nor next to the citing file."""
    found = []
    for name, text in files:
        here = (root / name).parent
        for match in DESIGN_CITATION.finditer(text):
            cited = match.group(1)
            if (root / cited).is_file() or (here / cited).is_file():
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{name}:{line}: {cited}")
    return found


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def broken_docs_links(files: list[tuple[str, str]], root: Path) -> tuple[list[str], int]:
    """Links from outside docs/ to docs pages whose file, anchor or quoted heading does not exist;
    and how many links were checked."""
    headings: dict[str, list[str]] = {}
    broken, checked = [], 0
    for name, text in files:
        if name.startswith("docs/"):
            continue
        for match in DOCS_LINK.finditer(text):
            checked += 1
            page, anchor, title = match.groups()
            where = f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
            path = root / "docs" / page
            if not path.is_file():
                broken.append(f"{where} (no such page)")
                continue
            if page not in headings:
                headings[page] = [h.strip() for h in HEADING.findall(path.read_text(encoding="utf-8"))]
            if anchor is not None and anchor not in {slug(h) for h in headings[page]}:
                broken.append(f"{where} (no heading with this anchor)")
            if title is not None and title not in headings[page]:
                broken.append(f"{where} (no such heading)")
    return broken, checked


def bare_section_signs(files: list[tuple[str, str]]) -> list[str]:
    """`path:line: text` for each section sign outside docs/*.md and the changelog that is not part
    of an RFC or draft citation: such a section belongs to some document the reader cannot tell."""
    found = []
    for name, text in files:
        if (name.startswith("docs/") and name.endswith(".md")) or name.startswith("CHANGELOG"):
            continue
        cited = {m.start() + i for m in RFC_SECTIONS.finditer(text) for i in range(m.end() - m.start())}
        for match in re.finditer(SECTION, text):
            if match.start() not in cited:
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{name}:{line}: {text.splitlines()[line - 1].strip()}")
    return found


def test_no_citations_of_design_documents_outside_the_repository() -> None:
    missing = missing_design_citations(tracked_text_files(), ROOT)
    assert not missing, "cite a docs/ page or an RFC instead of:\n" + "\n".join(missing)


def test_every_section_sign_belongs_to_an_rfc_citation() -> None:
    bare = bare_section_signs(tracked_text_files())
    assert not bare, "name the RFC, or cite a docs/ page instead of a bare section:\n" + "\n".join(bare)


def test_docs_links_point_to_existing_pages_and_headings() -> None:
    broken, checked = broken_docs_links(tracked_text_files(), ROOT)
    assert checked > 0, "no docs/ link found: the scan itself is broken"
    assert not broken, "broken docs/ links:\n" + "\n".join(broken)


def test_the_scans_tell_good_citations_from_bad(tmp_path: Path) -> None:
    """The two scans on a small tree: what must be flagged is, what must pass does. Names are built
    at run time so that this file cites nothing itself."""
    page, design, docs, s = "harmony" + ".md", "transport" + ".md", "docs" + "/", SECTION
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / page).write_text("# Harmony\n\n## Session flow\n\n### Sans-I/O interface\n")
    files = [
        ("src/a.py", f"# see {design} {s}7 and {docs}{page}#session-flow\n"),
        ("src/b.py", f'# see {docs}{page}, "Session flow" and {docs}{page}#sans-io-interface\n'),
        ("src/c.py", f'# {docs}{page}#no-such-part, {docs}{page}, "Nope", {docs}gone.md\n'),
        ("docs/index.md", f"[Harmony]({page}), [Gone](gone.md)\n"),
    ]
    assert missing_design_citations(files, tmp_path) == [f"src/a.py:1: {design}"]
    broken, checked = broken_docs_links(files, tmp_path)
    assert checked == 6
    assert [b.split(": ", 1)[1] for b in broken] == [
        f"{docs}{page}#no-such-part (no heading with this anchor)",
        f'{docs}{page}, "Nope" (no such heading)',
        f"{docs}gone.md (no such page)",
    ]


def test_the_section_scan_tells_rfc_sections_from_bare_ones() -> None:
    """RFC and draft sections pass, also continued or split over a comment's lines; a bare `(<S>6.2)`
    fails, even on a line that cites an RFC elsewhere. Built at run time: this file has no section sign."""
    s, docs = SECTION, "docs" + "/"
    good = [
        ("src/a.py", f"# consent (RFC 7675 {s}5.1), alerts (RFC 5246 {s}7.2.1)\n"),
        ("src/b.pyx", f"# padding (RFC 8285 {s}4.2, {s}4.3) and RFC 3550 {s}6.4 and {s}A.8\n"),
        ("src/c.py", f"# a close_notify (RFC 5246\n# {s}7.2.1)\n"),
        ("web/g.ts", f"// transport-wide CC (draft-holmer-rmcat-transport-wide-cc-extensions-01 {s}3)\n"),
        (f"{docs}x.md", f"Design {s}6.2 here is allowed.\n"),
        ("CHANGELOG.md", f"- old note ({s}6.2)\n"),
    ]
    assert bare_section_signs(good) == []
    bad = [
        ("src/d.py", f"x = 1  # a keep-alive ({s}6.2)\n"),
        ("src/e.h", f"/* RFC 3711 {s}3.3 says so; the keep-alive ({s}6.2) too */\n"),
        ("tests/f.mjs", f"// {s}9.3: the fake adapter\n"),
    ]
    assert [b.split(":")[0] for b in bare_section_signs(bad)] == ["src/d.py", "src/e.h", "tests/f.mjs"]
