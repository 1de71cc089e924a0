"""The README and the pages under docs/, as the tests that hold them to the code read them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    p.relative_to(ROOT).as_posix(): p
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
}
TEXT = "\n".join(p.read_text() for p in PAGES.values())  # every page, for names a user may meet


def block_after(marker: str, page: str = "README.md") -> str:
    """The code block that follows `<!-- marker -->` on a page."""
    text = PAGES[page].read_text()
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"{page} has no block after <!-- {marker} -->"
    return match.group(1)
