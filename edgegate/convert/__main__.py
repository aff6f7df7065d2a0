"""``python -m edgegate.convert --markdown``: print ``docs/models.md`` as generated from the registries.

Stage: documentation (a developer entry point, like the CLI: it prints). Input: none. Output: the
Markdown on stdout; ``--write PATH`` writes it to a file instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgegate.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print docs/models.md")
    parser.add_argument("--write", type=Path, metavar="PATH", help="write it to PATH (e.g. docs/models.md)")
    args = parser.parse_args(argv)
    if not (args.markdown or args.write):
        parser.error("nothing to do: give --markdown or --write PATH")
    # torch and every converter (the docs describe their nn modules): loaded once the arguments are checked
    from edgegate.convert.docs import markdown

    text = markdown()
    if args.write:
        args.write.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
