"""The Markdown pages: every relative link and figure path resolves, and every #anchor names a heading of its page
(GitHub's slugs), so a reader who follows the README never lands on nothing."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return sorted({ROOT / name for name in listed} | set(ROOT.glob("*.md")) | set(ROOT.glob("docs/*.md")))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but hyphens and underscores), spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#+ (.*)$", text)}


def test_the_slug_rule_matches_github_on_known_headings():
    assert slug("Combining layers: one detector fit on in-distribution training images only") == (
        "combining-layers-one-detector-fit-on-in-distribution-training-images-only")
    assert slug("On a GPU, and at scale") == "on-a-gpu-and-at-scale"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_figure_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
