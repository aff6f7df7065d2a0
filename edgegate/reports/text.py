"""Plain-text building blocks for terminal reports: aligned tables, labelled lines, sizes.

Input: strings and numbers. Output: lines of plain text, the same for a person at a terminal and for a
pipe (no box drawing, no colour, never wrapped at the terminal width), so ``grep``/``awk`` can read them.
Standard library only: the runtime side (``inspect`` of a bundle, ``bench``) uses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

LABEL_WIDTH = 13  # "Latency (ms) : ...": the label column of every labelled block (bench, inspect, export)
PACK_WIDTH = 100  # items packed into lines of about this many characters (a choice, not the terminal's width)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart, a dashed rule under the headers."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line(list(headers)), line(["-" * w for w in widths]), *(line(r) for r in cells)]


def labelled(label: str, texts: Sequence[str]) -> list[str]:
    """``Label        : first`` then ``             : next`` for each further text."""
    return [f"{label if i == 0 else '':<{LABEL_WIDTH}}: {t}" for i, t in enumerate(texts)] if texts else []


def pack(items: Iterable[str], sep: str = ", ", width: int = PACK_WIDTH) -> list[str]:
    """Items joined by `sep` into lines of at most about `width` characters (an item is never split)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def size(n: int | float) -> str:
    """Bytes for people: 812 B, 38.4 KiB, 5.2 MiB."""
    units, i, value = ("B", "KiB", "MiB", "GiB"), 0, float(n)
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{value:.0f} B" if i == 0 else f"{value:.1f} {units[i]}"


def num(v: object, digits: int = 4) -> str:
    """A metric value: floats to `digits` significant digits, None as '-', the rest as str."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)
