"""Test helpers for the HTML report: the images a page shows."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def page_images(page: Path) -> list[bytes]:
    """The bytes of every ``<img>`` of ``page``, each resolved beside the page, in order."""
    parser = _Images()
    parser.feed(page.read_text())
    return [(page.parent / src).read_bytes() for src in parser.src]
