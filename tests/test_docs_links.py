"""The project's documents hold together: every relative link points to a file that exists, and the
text speaks about the project (no words about how the work was organised).

Checked documents: README.md, docs/*.md, benchmarks/*.md (links: README.md, docs/*.md and
benchmarks/RESULTS.md; wording: also every text file under locmoe_plugin/).
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ``[text](target)`` and ``![alt](target)``; the target ends at the first space or ``)``
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: words about how the work was organised, not about the project
ORGANISATION_WORDS = re.compile(r"session|issue [0-9]|missed", re.IGNORECASE)
TEXT_SUFFIXES = (".py", ".md", ".txt", ".json", ".toml", ".cfg", ".sh")


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _docs_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _broken_links(path: str) -> list[str]:
    """``"file:line: target"`` for each relative link in ``path`` whose target does not exist.
    Web links, mail links and in-page anchors are not checked; ``#anchor`` / ``?query`` are cut off."""
    broken = []
    in_code = False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                    continue
                file_part = re.split(r"[#?]", target, maxsplit=1)[0]
                if not os.path.exists(os.path.join(os.path.dirname(path), file_part)):
                    broken.append(f"{_rel(path)}:{n}: {target}")
    return broken


def _offending_lines(paths: list[str]) -> list[str]:
    """``"file:line: text"`` for each line of ``paths`` with a word about how the work was organised."""
    hits = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        hits += [f"{_rel(path)}:{n}: {line.strip()}" for n, line in enumerate(lines, 1)
                 if ORGANISATION_WORDS.search(line)]
    return hits


def _package_text_files() -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "locmoe_plugin")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(TEXT_SUFFIXES)]
    return sorted(out)


@pytest.mark.parametrize("paths", [
    pytest.param(lambda: [os.path.join(ROOT, "README.md")], id="README.md"),
    pytest.param(_docs_files, id="docs"),
    pytest.param(lambda: [os.path.join(ROOT, "benchmarks", "RESULTS.md")], id="benchmarks/RESULTS.md"),
])
def test_relative_links_point_to_existing_files(paths):
    broken = [b for p in paths() for b in _broken_links(p)]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


@pytest.mark.parametrize("paths", [
    pytest.param(lambda: [os.path.join(ROOT, "README.md")], id="README.md"),
    pytest.param(_docs_files, id="docs"),
    pytest.param(lambda: sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.md"))), id="benchmarks/*.md"),
    pytest.param(_package_text_files, id="locmoe_plugin"),
])
def test_text_speaks_about_the_project(paths):
    hits = _offending_lines(paths())
    assert not hits, "words about how the work was organised (session, issue N, missed):\n" + "\n".join(hits)


def test_the_checks_can_fail(tmp_path):
    """The link and wording checks find what they are meant to find."""
    doc = tmp_path / "doc.md"
    (tmp_path / "there.md").write_text("x")
    doc.write_text("[ok](there.md) [ok](there.md#part) [web](https://example.org) [anchor](#top)\n"
                   "[gone](missing/file.md)\n```\n[in code](not/checked.md)\n```\nThe run was MISSED.\n")
    assert _broken_links(str(doc)) == [f"{_rel(str(doc))}:2: missing/file.md"]
    assert [h.split(":")[1] for h in _offending_lines([str(doc)])] == ["6"]
