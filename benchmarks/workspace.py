"""The models a run benchmarks: checkpoints and bundles, made once per run in a scratch directory.

Zoo models are trained with ``edgegate.zoo`` (deterministic, seconds each); the ResNet-style CNN of
``benchmarks.models`` is trained briefly on the digits; all are saved as edgegate checkpoints and
exported with ``edgegate.pipeline.run_export`` exactly as ``edgegate export`` does. Each export's
wall time and the pipeline's own per-step timings are kept for the export-time section.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESNET = "resnet_digits"
WIDE_EXIT = "early_exit_wide"  # the zoo's early-exit MLP at widths where compute, not call overhead, dominates
WIDE_EXIT_HIDDEN = [256, 1024, 2048]
TERNARY = "ternary_projection"  # one 4096 x 4096 BitNet layer (1024 at the smoke size)
CLASSES = {RESNET: "benchmarks.models:ResNetDigits", TERNARY: "benchmarks.models:TernaryProjection"}


@dataclass
class Export:
    path: Path
    wall_s: float
    timings_s: dict[str, float]
    manifest: dict[str, Any]


@dataclass
class Workspace:
    """Scratch directory + memo of checkpoints and exports (key: model, quant, batch, exit form)."""

    smoke: bool
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="edgegate-bench-")))
    _checkpoints: dict[str, Path] = field(default_factory=dict)
    _exports: dict[tuple, Export] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)

    def checkpoint(self, name: str) -> Path:
        if name not in self._checkpoints:
            path = self.root / f"{name}.pt"
            t0 = time.perf_counter()
            if name == RESNET:
                _train_resnet(path, epochs=1 if self.smoke else 6, width=16 if self.smoke else 32)
            elif name == WIDE_EXIT:
                _train_wide_exit(path, epochs=2 if self.smoke else 8)
            elif name == TERNARY:
                _make_ternary(path, features=1024 if self.smoke else 4096)
            else:
                from edgegate import zoo

                zoo.train_and_save(name, path)
            self.train_seconds[name] = round(time.perf_counter() - t0, 3)
            self._checkpoints[name] = path
        return self._checkpoints[name]

    def export(self, name: str, quant: str = "fp32", batch: int | None = None, exit_form: str = "auto",
               fresh: bool = False, tag: str = "") -> Export:
        """The bundle of ``name`` (memoized unless ``fresh``: the export-time section re-runs it)."""
        import json

        from edgegate.pipeline import ExportConfig, run_export

        key = (name, quant, batch, exit_form)
        if key in self._exports and not fresh:
            return self._exports[key]
        ckpt = self.checkpoint(name)
        out = self.root / f"{name}-{quant}-{batch or 'dyn'}-{exit_form}{tag}.edgegate"
        config = ExportConfig(quant=quant, batch=batch, exit_form=exit_form, overwrite=True,
                              model_class=CLASSES.get(name))
        t0 = time.perf_counter()
        path = run_export(ckpt, out, config)
        wall = time.perf_counter() - t0
        manifest = json.loads((path / "manifest.json").read_text())
        export = Export(path, round(wall, 4), manifest["timings_s"], manifest)
        if key not in self._exports:
            self._exports[key] = export
        return export

    def dataset(self, name: str):
        """The model's dataset as the pipeline splits it: (calibration = val, held-out = test)."""
        from edgegate.data import load_data
        from edgegate.loading import load
        from edgegate.loading.inputs import single_input

        loaded = load(self.checkpoint(name), model_class=CLASSES.get(name))
        inp = single_input(loaded.spec)
        data = load_data(loaded.spec["meta"]["dataset"], [inp.name], {inp.name: inp.shape})
        return data.split("val"), data.split("test"), inp.name, np.dtype(inp.dtype)


def _train_resnet(path: Path, epochs: int, width: int) -> None:
    """Train ``ResNetDigits`` on the digits train split with the zoo's deterministic loop; save it."""
    import torch

    from benchmarks.models import ResNetDigits
    from edgegate.data import load_data
    from edgegate.loading import save
    from edgegate.zoo.training import accuracy, cross_entropy, deterministic, fit, predict, tensors

    data = load_data("digits", ["x"], {"x": (1, 8, 8)})
    with deterministic(0, threads=torch.get_num_threads()):
        model = ResNetDigits(width=width)
        x, y = tensors(data, "train")
        fit(model, x, y, cross_entropy, epochs=epochs, batch_size=64, lr=2e-3, seed=0, weight_decay=1e-4)
        xt, yt = tensors(data, "test")
        acc = accuracy(predict(model, xt), yt)
    meta = {"dataset": "digits", "seed": 0, "inputs": [{"name": "x", "shape": [1, 8, 8], "dtype": "float32"}],
            "metrics": {"test_accuracy": acc, "epochs": epochs}}
    save(model, path, meta=meta)


def _train_wide_exit(path: Path, epochs: int) -> None:
    """``ExitMLP`` at ``WIDE_EXIT_HIDDEN`` on the clusters, the zoo recipe's loss and threshold rule, fewer epochs."""
    import torch

    from edgegate.data import load_data
    from edgegate.datasets import CLUSTERS_KW
    from edgegate.loading import save
    from edgegate.nn import ExitMLP
    from edgegate.zoo.recipes import fit_exits
    from edgegate.zoo.training import deterministic

    n_feat = CLUSTERS_KW["n_features"]
    data = load_data("clusters", ["x"], {"x": (n_feat,)})
    with deterministic(0, threads=torch.get_num_threads()):
        model = ExitMLP(n_feat, hidden=WIDE_EXIT_HIDDEN, n_classes=CLUSTERS_KW["n_classes"], n_stages=3)
        fit_exits(model, data, 0, epochs=epochs, lr=1e-3)
    meta = {"dataset": "clusters", "seed": 0, "inputs": [{"name": "x", "shape": [n_feat], "dtype": "float32"}],
            "metrics": {"epochs": epochs}}
    save(model.eval(), path, meta=meta)


def _make_ternary(path: Path, features: int) -> None:
    """``TernaryProjection`` with seeded random weights (no task to train it on) and a calibration file of
    seeded Gaussian rows next to it, which ``--quant ternary`` requires (the layer's per-token activation
    quantizer needs no statistics)."""
    import torch

    from benchmarks.models import TernaryProjection
    from edgegate.loading import save

    torch.manual_seed(0)
    model = TernaryProjection(features).eval()
    calib = path.with_suffix(".calib.npz")
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, features)).astype(np.float32))
    save(model, path, meta={"dataset": str(calib), "seed": 0,
                            "inputs": [{"name": "x", "shape": [features], "dtype": "float32"}]})
