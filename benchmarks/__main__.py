"""``python -m benchmarks``: run the benchmark sections, write ``results.json`` and ``results.md``.

    python -m benchmarks                       # full size, every section (a user's run; minutes)
    python -m benchmarks --smoke               # smoke size (CI): small models, few calls
    python -m benchmarks --only ternary,snn --out results-partial.json

Ratios and goals are reported, never asserted: the exit code is 0 when every section ran (met or
missed), 1 when a section failed (its error is in the results), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SECTIONS = ("cpu_int8", "early_exit", "ternary", "snn", "export_time", "real_size", "fidelity_seeds")
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"
FORMAT, VERSION = "edgegate.benchmarks", 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="smoke size (CI): small models, few calls per repeat")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON; the Markdown table goes next to it "
                   "(.md)")
    return p.parse_args(argv)


def select(only: str) -> list[str]:
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise ValueError(f"unknown section {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]  # run order is fixed, whatever the order asked


def run(sections: list[str], smoke: bool, command: str, progress=None) -> dict:
    """Run ``sections`` in one process and return the results document (also what the test checks)."""
    import importlib

    from benchmarks.harness import Sizes, machine_info
    from benchmarks.workspace import Workspace

    sizes = Sizes.for_run(smoke)
    ws = Workspace(smoke=smoke)
    doc = {"format": FORMAT, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command, "size": "smoke" if smoke else "full",
           "sizes": {"repeats": sizes.repeats, "inner": sizes.inner, "warmup": sizes.warmup},
           "machine": machine_info(), "sections": {}}
    for name in sections:
        if progress:
            progress(name)
        t0 = time.perf_counter()
        try:
            result = {"status": "ok", **importlib.import_module(f"benchmarks.{name}").run(ws, sizes)}
        except Exception as e:  # a section that cannot run is reported, and the others still run
            result = {"status": "error", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        doc["sections"][name] = result
    if hasattr(os, "getloadavg"):
        doc["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    doc["train_seconds"] = ws.train_seconds
    doc["goals"] = [{"section": n, **g} for n, s in doc["sections"].items() for g in s.get("goals", [])]
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sections = select(args.only)
    except ValueError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2
    # Peers from two runtimes alternate on few cores: OpenMP workers must not spin between calls
    # (set before torch is imported; a value the user set wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.ERROR)
    from benchmarks.report import render

    command = "python -m benchmarks" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    doc = run(sections, args.smoke, command, progress=lambda n: print(f"[benchmarks] {n} ...", file=sys.stderr))
    doc["machine"]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=False, default=str) + "\n")
    table = render(doc)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    failed = [n for n, s in doc["sections"].items() if s["status"] == "error"]
    for n in failed:
        print(f"benchmarks: section {n} failed: {doc['sections'][n]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
