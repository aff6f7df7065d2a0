"""Stage 8, bench: a bundle's golden I/O replayed through its runner before anything is timed (numpy only).

Input: ``golden_io.npz`` (``input.<name>``, ``output.<name>``, written at export by ``edgegate.golden``), the
target's runner and the tolerance the manifest records. Output: a `GoldenCheck` (max |runner - golden| per
output), or `BenchError` saying the runtime here does not reproduce the export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgegate.data import read_npz
from edgegate.errors import DataError
from edgegate.reports.stats import BenchError

GOLDEN_FILE = "golden_io.npz"
Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class GoldenCheck:
    """Max |runner - golden| per output over ``samples`` inputs; integer/bool outputs must be 0."""

    samples: int
    atol: float
    max_abs_err: dict[str, float]


def read_golden(path: Path, name: str) -> tuple[Arrays, Arrays]:

    try:
        arrays = read_npz(path, f"bundle {name}: golden file", "re-export the bundle")
    except DataError as e:
        raise BenchError(str(e)) from e
    inputs = {k[6:]: v for k, v in arrays.items() if k.startswith("input.")}
    outputs = {k[7:]: v for k, v in arrays.items() if k.startswith("output.")}
    sizes = {v.shape[0] if v.ndim else None for v in inputs.values()}
    if not inputs or not outputs or len(sizes) != 1 or not next(iter(sizes)):
        raise BenchError(f"bundle {name}: {GOLDEN_FILE} needs input.*/output.* of one length; re-export")
    return inputs, outputs


def static_batch(manifest: Mapping[str, Any], runner: Any) -> int | None:
    batch = (manifest.get("export") or {}).get("batch")  # pipeline.py: None means a dynamic batch
    dim = runner.input_specs[0].shape[0] if runner.input_specs and runner.input_specs[0].shape else None
    return batch if batch is not None else dim if isinstance(dim, int) else None  # other tools' bundles


def check_golden(
    runner: Any, inputs: Arrays, expected: Arrays, static: int | None, atol: float, name: str
) -> GoldenCheck:
    n = next(iter(inputs.values())).shape[0]
    step = static or n  # a dynamic-batch golden set was made in one call, a static one per batch
    if n % step:
        raise BenchError(f"bundle {name}: {n} golden samples do not split into batches of {step}; re-export")
    missing = sorted(set(expected) - set(runner.output_names))
    if missing:
        raise BenchError(f"bundle {name}: golden check failed: no output {missing[0]}; re-export it")
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in expected}
    for i in range(0, n, step):
        out = runner.run({k: v[i : i + step] for k, v in inputs.items()})
        for k in expected:
            chunks[k].append(np.asarray(out[k]))
    errors = {}
    for k, want in expected.items():
        got = np.concatenate(chunks[k]) if want.ndim else chunks[k][-1]
        if got.shape != want.shape:
            raise BenchError(
                f"bundle {name}: golden check failed: output {k} has shape {got.shape}, "
                f"golden {want.shape}; re-export the bundle"
            )
        exact = want.dtype.kind in "biu"
        err = max_abs_err(got, want)
        errors[k] = err
        failed = err > 0 if exact else not err <= atol  # `not <=`: a NaN error fails too
        if failed:
            limit = "exact match" if exact else f"atol {atol:g}"
            raise BenchError(
                f"bundle {name}: golden check failed: output {k} max |error| {err:.4g} "
                f"(needs {limit}) on {n} golden samples; the runtime here does not reproduce "
                "the export: check runtime versions or re-export the bundle"
            )
    return GoldenCheck(samples=n, atol=atol, max_abs_err=errors)


def max_abs_err(got: np.ndarray, want: np.ndarray) -> float:
    if got.size == 0:
        return 0.0
    g, w = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(w)  # NaN where golden has NaN is a match; elsewhere inf
    diff = np.where(both_nan, 0.0, np.abs(g - w))
    return float(np.max(np.nan_to_num(diff, nan=np.inf)))
