"""The documentation holds together: README.md stays a short landing page, every relative link in
README.md, CHANGELOG.md and docs/*.md reaches a file that exists and, with an #anchor, a heading of
that file (GitHub's slugs), and no page cites a bare issue number.

Pure Python and fast: nothing of the project and no torch is imported here. To run it alone without
importing torch, skip the shared fixtures (tests/conftest.py imports transformers, and with it torch)
and pytest-randomly (it loads DeepSpeed's random seeder, and with it torch):
    python -m pytest -q -p no:cacheprovider -p no:randomly --noconftest tests/test_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
DOC_PAGES = ["data-and-conditions", "gpu-training", "families", "evaluation", "pipeline", "params", "benchmarks"]
README_LIMIT = 15_000  # bytes, as `wc -c README.md` counts them

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.I)
BARE_NUMBER = re.compile(r"(?<![\w&/])#\d+")


def pages() -> list[Path]:
    return [README, CHANGELOG, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (fenced lines are blanked, so line numbers stay)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if FENCE.match(line.strip()):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def prose(text: str) -> str:
    """The text outside code blocks, with inline code spans kept as their bare text (a link's text
    may be code; a span's content is never a link)."""
    return CODE_SPAN.sub(lambda m: m.group(2).replace("[", "(").replace("]", ")"), "\n".join(prose_lines(text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation dropped (all but
    letters, digits, '-', '_' and spaces), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file, duplicates numbered as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[str, str]]:
    """(text, target) of every inline link and image outside code."""
    return [(m.group(1), m.group(2)) for m in LINK.finditer(prose(path.read_text(encoding="utf-8")))]


def broken_links(path: Path) -> list[str]:
    problems = []
    for _, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... (not checked here)
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{path.relative_to(ROOT)}: {target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{path.relative_to(ROOT)}: {target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    return problems


def test_the_pages_exist():
    missing = [name for name in DOC_PAGES if not (ROOT / "docs" / f"{name}.md").is_file()]
    assert not missing, f"docs/ lacks {missing}"
    assert CHANGELOG.is_file()


def test_readme_is_a_short_landing_page():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at most {README_LIMIT} and move detail into docs/"
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    assert re.search(r"!\[[^\]]*\]\(docs/images/demo_grid\.png\)", prose(text)), "README.md does not show the demo grid"
    assert (ROOT / "docs/images/demo_grid.png").is_file()


def test_readme_links_every_doc_page():
    targets = {target.partition("#")[0] for _, target in links(README)}
    missing = [name for name in DOC_PAGES if f"docs/{name}.md" not in targets]
    assert not missing, f"README.md links none of {missing}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_bare_issue_numbers(page: Path):
    found = []
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
        line = LINK.sub(lambda m: f"[{m.group(1)}]", line)  # link targets (URLs, anchors) are not prose
        line = URL.sub("", line)
        found += [f"{page.relative_to(ROOT)}:{number}: {m.group(0)}" for m in BARE_NUMBER.finditer(line)]
    hint = "cite upstream threads as links, e.g. [diffusers issue 11181](https://github.com/huggingface/diffusers/issues/11181)"
    assert not found, hint + ":\n" + "\n".join(found)


def test_the_checker_itself():
    assert slug("Know before you rent: the GPU check") == "know-before-you-rent-the-gpu-check"
    assert slug("The embedded demo's results") == "the-embedded-demos-results"
    assert slug("`gpu: auto`") == "gpu-auto"
    assert slug("What reruns, and what a rerun gives") == "what-reruns-and-what-a-rerun-gives"
    assert slug("Try it (CPU, no GPU, no network beyond PyPI)") == "try-it-cpu-no-gpu-no-network-beyond-pypi"
    text = "see [a](b.md#c) and ![x](d.png)\n```\n[not](a-link.md)\n```\n`[nor](this.md)`"
    assert LINK.findall(prose(text)) == [("a", "b.md#c"), ("x", "d.png")]
    assert BARE_NUMBER.findall("diffusers #11181, but not &#123; nor a/b#12") == ["#11181"]
