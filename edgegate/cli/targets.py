"""`edgegate targets`: every target, whether it builds and runs here, and what to install if not."""

from __future__ import annotations

import argparse
import json

from edgegate.reports.text import table


def cmd_targets(args: argparse.Namespace) -> int:
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate import targets

    rows = []
    for t in targets.all_targets():
        builds, why = t.is_available()
        runs, run_why = targets.can_run(t) if builds else (False, why)
        rows.append({"target": t.name, "builds": builds, "runs": runs, "description": t.description,
                     "why_not": "" if runs else run_why, "options": t.option_names()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    yes_no = {True: "yes", False: "no"}

    def note(r: dict) -> str:  # what to do first: an unavailable target's reason names the extra to install
        return r["description"] if r["runs"] else r["why_not"] if not r["builds"] else \
            f"{r['description']}; {r['why_not']}"

    print("\n".join(table(("target", "builds here", "runs here", "description / what to do"),
                          [(r["target"], yes_no[r["builds"]], yes_no[r["runs"]], note(r)) for r in rows])))
    print("\nexport options (-O KEY=VALUE):")
    print("\n".join(f"  {r['target']}: {', '.join(r['options']) or 'none'}" for r in rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("targets", help="list targets, whether each builds and runs here, and what to install",
                       description="Works with numpy + onnxruntime only: a device runs it to see what it can run.")
    t.add_argument("--json", action="store_true", help="print the list as JSON")
    t.set_defaults(func=cmd_targets)
