"""`edgegate targets`: every target, whether it builds and runs here, and what to install if not."""

from __future__ import annotations

import argparse

from edgegate.cli._common import console


def cmd_targets(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgegate import targets

    table = Table("target", "builds here", "runs here", "description / what to do")
    for t in targets.all_targets():
        ok, why = t.is_available()
        runs, run_why = targets.can_run(t) if ok else (False, why)
        text = t.description if runs else why if not ok else f"{t.description}; {run_why}"
        table.add_row(t.name, "yes" if ok else "no", "yes" if runs else "no", text)
    console().print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("targets", help="list targets and whether each can run here")
    t.set_defaults(func=cmd_targets)
