"""Sweeps on Ray (DESIGN.md §12): a spec of models x targets x quantization variants -> one row per cell.

Input: a TOML spec (``spec``: read, validate, expand into cells). Each cell is one Ray task
(``runner``) that exports, compares and benches one variant on the node Ray picks (``cell``); rows
are cached by content in the output folder (``store``), so a re-run or ``--resume`` skips finished
cells. Output: ``DIR/sweep.json`` (``"format": "edgegate.sweep"``) and ``DIR/report.html`` with the
Pareto front of quality vs latency (``report``). Ray is the ``cluster`` extra, imported only when
cells must run.
"""

from __future__ import annotations

from edgegate.sweep.report import pareto_front, render_text
from edgegate.sweep.runner import RayOptions, SweepResult, run_sweep
from edgegate.sweep.spec import Cell, SweepError, SweepSpec, expand, load_spec
from edgegate.sweep.store import FORMAT, FORMAT_VERSION

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Cell",
    "RayOptions",
    "SweepError",
    "SweepResult",
    "SweepSpec",
    "expand",
    "load_spec",
    "pareto_front",
    "render_text",
    "run_sweep",
]
