"""What ``edgegate export`` prints when it is done: the bundle, its steps in run order, then fidelity.

Input: the bundle path, its manifest, the wall time of each step in run order (``import`` first: loading
torch/onnx/brevitas is often the longest step of a small model) and the total. Output: plain text that
ends with what a user checks before deploying: the golden check, the quantization with its gate
fidelity, and what was kept in higher precision.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from edgegate.reports.bundle_text import gate_label, golden_lines, quant_lines
from edgegate.reports.text import labelled, pack, size

__all__ = ["render_export"]


def render_export(path: str | os.PathLike[str], manifest: Mapping[str, Any], steps: Mapping[str, float],
                  total_s: float) -> str:
    gates = (manifest.get("gates") or {}).get("gates", [])
    files = {k: v.get("bytes", 0) for k, v in (manifest.get("files") or {}).items()}
    scheme = (manifest.get("quant") or {}).get("scheme") or "fp32"
    shown = "; ".join(f"{gate_label(g)}: {g.get('kind')}" for g in gates) or "no gates"
    lines = [f"wrote {path}: target {manifest.get('target')}, {scheme}, {len(gates)} gate"
             f"{'' if len(gates) == 1 else 's'} ({shown}), {size(sum(files.values()))} in {len(files)} files"]
    timed = [f"{name} {seconds:.2f}" for name, seconds in steps.items()]
    lines += labelled("Steps (s)", pack([*timed[:-1], f"{timed[-1]}; total {total_s:.2f}"] if timed else []))
    lines += golden_lines(manifest)
    lines += quant_lines(manifest)
    return "\n".join(lines)
